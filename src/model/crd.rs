//! The `ClusterEndpoint` custom resource (`clusterendpoints.sealos.io/v1beta1`): its status type
//! and the finished CRD. The object type itself is derived from the shared spec in
//! `model::spec`, so definition files and objects never drift apart.
//!
//! `endpoints-operator crd` prints [`yaml`]; `deploy/crd.yaml` holds exactly that output
//! (regenerate with `cargo run -- crd > deploy/crd.yaml`, a test fails when it is stale).

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use super::spec::ClusterEndpoint;
use super::spec::UdpData;

/// Condition types of the original operator.
#[allow(dead_code)] // for the status writer, still to come
pub mod condition {
    pub const INITIALIZED: &str = "Initialized";
    pub const SYNC_SERVICE_READY: &str = "SyncServiceReady";
    pub const SYNC_ENDPOINT_READY: &str = "SyncEndpointReady";
    pub const READY: &str = "Ready";
}

/// Phases of the original operator.
#[allow(dead_code)] // for the status writer, still to come
pub mod phase {
    pub const PENDING: &str = "Pending";
    pub const HEALTHY: &str = "Healthy";
    pub const UNHEALTHY: &str = "UnHealthy";
}

/// What the daemon last saw of a `ClusterEndpoint`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEndpointStatus {
    /// Pending, Healthy or UnHealthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// Initialized, SyncServiceReady, SyncEndpointReady and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready hosts of all, counted per port, such as `3/4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_hosts: Option<String>,
    /// Health of every host, per port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortStatus>,
}

/// Health of the hosts of one port.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    /// The port's name (empty for a single unnamed port).
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostStatus>,
}

/// Health of one host on one port.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub host: String,
    pub ready: bool,
    /// When `ready` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Outcome of the last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
    /// Error of the last failed probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub consecutive_successes: i64,
    #[serde(default)]
    pub consecutive_failures: i64,
}

/// `udpSocket.data` is a string or a list of bytes. A structural schema cannot give one field two
/// types (and the derived schema of an untagged enum is rejected), so it has no type and keeps
/// whatever it is given. Only the daemon checks it: the API server cannot compile a CEL rule on an
/// untyped field ("unable to convert structural schema to CEL declarations"), and leaves such a
/// field out of its parent's CEL type, so no rule can see it.
impl JsonSchema for UdpData {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "UdpData".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Payload to send: a string or a list of bytes (0-255).",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// The CRD, ready to apply.
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(ClusterEndpoint::crd()).expect("CRD serializes");
    for version in value["spec"]["versions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if let Some(schema) = version.pointer_mut("/schema/openAPIV3Schema") {
            make_structural(schema);
        }
    }
    serde_json::from_value(value).expect("CRD deserializes")
}

/// The CRD as YAML, as `endpoints-operator crd` prints it.
pub fn yaml() -> String {
    let body = serde_saphyr::to_string(&crd()).expect("CRD serializes to YAML");
    format!(
        "# Generated by `endpoints-operator crd`; do not edit.\n\
         # Regenerate with: cargo run -- crd > deploy/crd.yaml\n{body}"
    )
}

/// Fixes what the derived schema gets wrong for a CRD, in every node:
/// - `additionalProperties: false` (from `deny_unknown_fields`) is not allowed next to
///   `properties`; the API server prunes unknown fields instead.
/// - A field with a default is not `nullable`: then an explicit `null` is pruned and defaulted
///   rather than stored.
fn make_structural(node: &mut Value) {
    let Some(object) = node.as_object_mut() else {
        return;
    };
    if object.get("additionalProperties") == Some(&json!(false)) {
        object.remove("additionalProperties");
    }
    if object.contains_key("default") {
        object.remove("nullable");
    }
    if let Some(properties) = object.get_mut("properties").and_then(Value::as_object_mut) {
        properties.values_mut().for_each(make_structural);
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = object.get_mut(key) {
            make_structural(child);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(children) = object.get_mut(key).and_then(Value::as_array_mut) {
            children.iter_mut().for_each(make_structural);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    /// Every node the API server would reject as non-structural, by path.
    fn structural_errors(node: &Value, path: &str, errors: &mut Vec<String>) {
        let object = node.as_object().unwrap();
        let untyped_ok = object.contains_key("x-kubernetes-preserve-unknown-fields")
            || object.contains_key("x-kubernetes-int-or-string");
        if !object.contains_key("type") && !untyped_ok {
            errors.push(format!("{path}: no type"));
        }
        for key in [
            "anyOf",
            "oneOf",
            "allOf",
            "not",
            "$ref",
            "additionalProperties",
        ] {
            if object.contains_key(key) {
                errors.push(format!("{path}: {key}"));
            }
        }
        for (name, child) in object
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            structural_errors(child, &format!("{path}.{name}"), errors);
        }
        if let Some(items) = object.get("items") {
            structural_errors(items, &format!("{path}[]"), errors);
        }
    }

    #[test]
    fn the_schema_is_structural() {
        let mut errors = Vec::new();
        structural_errors(&schema(), "", &mut errors);
        assert!(errors.is_empty(), "{errors:#?}");
    }

    #[test]
    fn names_scope_status_and_columns() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("clusterendpoints.sealos.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "ClusterEndpoint");
        assert_eq!(crd.spec.names.short_names, Some(vec!["cep".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1beta1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("Phase", ".status.phase"),
                ("Ready", ".status.readyHosts"),
                ("Age", ".metadata.creationTimestamp")
            ]
        );
    }

    #[test]
    fn defaults_minimums_and_unique_port_names() {
        let spec = &schema()["properties"]["spec"];
        assert_eq!(spec["properties"]["periodSeconds"]["default"], 10);
        assert_eq!(spec["properties"]["periodSeconds"]["minimum"], 1.0);
        assert_eq!(spec["properties"]["periodSeconds"].get("nullable"), None);
        assert_eq!(spec["properties"]["clusters"]["items"]["type"], "string");
        let ports = &spec["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-list-type"], "map");
        assert_eq!(ports["x-kubernetes-list-map-keys"], json!(["name"]));
        let port = &ports["items"]["properties"];
        // A list-map key must be required or defaulted.
        assert_eq!(port["name"]["default"], "");
        for (field, min, default) in [
            ("timeoutSeconds", 1, Some(1)),
            ("successThreshold", 1, Some(1)),
            ("failureThreshold", 1, Some(3)),
            ("port", 1, None),
            ("targetPort", 0, None),
        ] {
            assert_eq!(port[field]["minimum"], min as f64, "{field}");
            assert_eq!(
                port[field].get("default"),
                default.map(Value::from).as_ref()
            );
        }
        assert_eq!(port["port"]["maximum"], 65535.0);
        assert_eq!(port["targetPort"]["maximum"], 65535.0);
        let data = &port["udpSocket"]["properties"]["data"];
        assert_eq!(data["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(data.get("type"), None);
    }

    #[test]
    fn the_committed_crd_is_current() {
        let committed = include_str!("../../deploy/crd.yaml");
        assert!(
            committed == yaml(),
            "deploy/crd.yaml is stale: regenerate with `cargo run -- crd > deploy/crd.yaml`"
        );
    }

    #[test]
    fn the_yaml_reads_back_as_the_crd() {
        let back: CustomResourceDefinition = serde_saphyr::from_str(&yaml()).unwrap();
        assert_eq!(back, crd());
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = ClusterEndpointStatus {
            phase: phase::HEALTHY.into(),
            ready_hosts: Some("1/1".into()),
            observed_generation: Some(2),
            ports: vec![PortStatus {
                name: "pg".into(),
                hosts: vec![HostStatus {
                    host: "192.0.2.10".into(),
                    ready: true,
                    since: Some("2025-01-01T00:00:00Z".into()),
                    consecutive_successes: 4,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(value["readyHosts"], "1/1");
        assert_eq!(value["ports"][0]["hosts"][0]["consecutiveSuccesses"], 4);
        assert_eq!(
            serde_json::from_value::<ClusterEndpointStatus>(value).unwrap(),
            status
        );
    }
}
