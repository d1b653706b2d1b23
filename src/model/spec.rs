//! The user-facing `ClusterEndpoint` spec, field for field as the original operator documents it.
//! Files and (later) the CRD deserialize into these types; `model::validate` turns them into the
//! trusted model. Nothing here is checked beyond its shape.

use std::collections::BTreeMap;

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

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterEndpointSpec {
    /// `None` makes the Service headless; an IP asks for that ClusterIP; absent lets the API
    /// server allocate one.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    pub period_seconds: Option<i64>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Target clusters by name; absent means every configured cluster.
    pub clusters: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: String,
    pub protocol: Option<String>,
    pub port: i64,
    pub target_port: Option<i64>,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub timeout_seconds: Option<i64>,
    pub success_threshold: Option<i64>,
    pub failure_threshold: Option<i64>,
    pub initial_delay_seconds: Option<i64>,
    pub tcp_socket: Option<TcpSocketSpec>,
    pub http_get: Option<HttpGetSpec>,
    pub udp_socket: Option<UdpSocketSpec>,
    pub grpc: Option<GrpcSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketSpec {
    /// Off unless set, as in the original operator: a probe block with `enable: false` is inert.
    #[serde(default)]
    pub enable: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM certificates to trust.
    pub ca_bundle: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UdpSocketSpec {
    /// Off unless set, as in the original operator: a probe block with `enable: false` is inert.
    #[serde(default)]
    pub enable: bool,
    pub data: Option<UdpData>,
}

/// The original schema said "byte array" while its own README example used a string: accept both.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum UdpData {
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcSpec {
    /// Off unless set, as in the original operator: a probe block with `enable: false` is inert.
    #[serde(default)]
    pub enable: bool,
    pub service: Option<String>,
    /// Present: connect with TLS (verified only when it has a `caBundle`).
    pub tls: Option<TlsSpec>,
}
