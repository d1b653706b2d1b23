//! The user-facing `ClusterEndpoint` spec, field for field as the original operator documents it.
//! Files and CRD objects deserialize into these types; `model::validate` turns them into the
//! trusted model. Nothing here is checked beyond its shape, except what the CRD schema lets the
//! API server enforce (the `schemars` attributes; see `model::crd`).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One `ClusterEndpoint` document as it appears in a YAML or TOML file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub metadata: Metadata,
    pub spec: ClusterEndpointSpec,
    /// Present in objects exported from a cluster; never read.
    #[serde(default, skip_serializing)]
    pub status: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    // Fields the API server sets, found in exported objects: accepted and never read, so a
    // typo such as `lables` is still an error.
    #[serde(default, skip_serializing)]
    pub(crate) uid: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) resource_version: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) generation: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) creation_timestamp: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) deletion_timestamp: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) deletion_grace_period_seconds: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) managed_fields: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) owner_references: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) finalizers: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) self_link: Option<IgnoredValue>,
    #[serde(default, skip_serializing)]
    pub(crate) generate_name: Option<IgnoredValue>,
}

/// Any value, dropped on reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IgnoredValue;

impl<'de> Deserialize<'de> for IgnoredValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| IgnoredValue)
    }
}

// The spec of a definition file and of a `ClusterEndpoint` object alike. The derive generates the
// object type `ClusterEndpoint` (see `model::crd` for its status and the finished CRD).
/// A selectorless Service named like the object, whose endpoints are the hosts of each port,
/// probed like the kubelet probes pods.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, CustomResource, JsonSchema)]
// Clippy takes the repeated `type_ = "string"` of two printer columns for a duplicate attribute.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "sealos.io",
    version = "v1beta1",
    kind = "ClusterEndpoint",
    namespaced,
    shortname = "cep",
    status = "crate::model::crd::ClusterEndpointStatus",
    derive = "PartialEq",
    doc = "A Service for hosts outside the cluster, with health-checked endpoints.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyHosts",
        description = "Ready hosts of all, counted per port"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterEndpointSpec {
    /// `None` makes the Service headless; an IP asks for that ClusterIP; absent lets the API
    /// server allocate one.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// How often each host is probed, in seconds (default 10).
    #[schemars(range(min = 1), extend("default" = 10))]
    pub period_seconds: Option<i64>,
    /// Port names are unique (at most one port may leave its name out).
    #[serde(default)]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub ports: Vec<PortSpec>,
    /// Target clusters by name; absent means every configured cluster (for an object: the
    /// cluster it is in, which it always targets).
    pub clusters: Option<Vec<String>>,
    /// Hosts for every port that lists none: where the original operator kept them before
    /// v0.2.1, accepted so objects of that time keep working.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    /// Required when there is more than one port.
    #[serde(default)]
    pub name: String,
    /// TCP (default), UDP or SCTP.
    pub protocol: Option<String>,
    /// The Service port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i64,
    /// The port on the hosts (default, or 0: `port`). 0 is allowed because clients of the
    /// original operator send it for "unset".
    #[schemars(range(min = 0, max = 65535))]
    pub target_port: Option<i64>,
    /// IP addresses.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[schemars(range(min = 1), extend("default" = 1))]
    pub timeout_seconds: Option<i64>,
    #[schemars(range(min = 1), extend("default" = 1))]
    pub success_threshold: Option<i64>,
    #[schemars(range(min = 1), extend("default" = 3))]
    pub failure_threshold: Option<i64>,
    #[schemars(range(min = 0))]
    pub initial_delay_seconds: Option<i64>,
    pub tcp_socket: Option<TcpSocketSpec>,
    pub http_get: Option<HttpGetSpec>,
    pub udp_socket: Option<UdpSocketSpec>,
    pub grpc: Option<GrpcSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketSpec {
    /// Off unless set, as in the original operator: a probe block with `enable: false` is inert.
    #[serde(default)]
    pub enable: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetSpec {
    pub path: Option<String>,
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
    /// Verify the server's certificate (HTTPS only); absent: no verification, like the kubelet.
    pub tls: Option<TlsSpec>,
}

/// TLS for a probe. With `caBundle` the server certificate must chain to it and match
/// `serverName` (default: the host's IP address); without it nothing is verified.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM certificates to trust.
    pub ca_bundle: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UdpSocketSpec {
    /// Off unless set, as in the original operator: a probe block with `enable: false` is inert.
    #[serde(default)]
    pub enable: bool,
    pub data: Option<UdpData>,
}

/// The original schema said "byte array" while its own README example used a string: accept both.
/// Its CRD schema is hand-written (`model::crd`): a derived one would not be structural.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum UdpData {
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcSpec {
    /// Off unless set, as in the original operator: a probe block with `enable: false` is inert.
    #[serde(default)]
    pub enable: bool,
    pub service: Option<String>,
    /// Present: connect with TLS (verified only when it has a `caBundle`).
    pub tls: Option<TlsSpec>,
}
