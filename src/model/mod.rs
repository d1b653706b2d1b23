//! The desired state: validated `ClusterEndpoint` definitions, free of Kubernetes and I/O.
//! Everything downstream (probe engine, renderer, sinks, status) trusts these types.

pub mod crd;
pub mod spec;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use validate::{KIND, Problem, validate};

/// Namespace and name of a definition: the identity of the Service it produces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct DefinitionKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for DefinitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated definition. Invalid hosts and ports have already been dropped (and reported).
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub key: DefinitionKey,
    /// Where it came from, for messages: `path/to/file.yaml (document 2)`.
    pub origin: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The Service's `clusterIP` when set: `"None"` (headless) or a fixed address.
    pub cluster_ip: Option<String>,
    /// Target cluster names; `None` means all configured clusters.
    pub clusters: Option<Vec<String>>,
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    /// Empty only when the definition has a single port.
    pub name: String,
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
    /// The port on each host, which is what gets probed and published in the endpoints.
    pub target_port: u16,
    pub hosts: Vec<IpAddr>,
    /// `None`: a static port, every host always ready.
    pub check: Option<Arc<Check>>,
    pub timing: Timing,
}

/// Probe cadence and thresholds, with kubelet meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timing {
    pub period: Duration,
    pub timeout: Duration,
    pub initial_delay: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// How one host:port is probed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Check {
    Tcp,
    Http(HttpCheck),
    /// Send the payload; any reply within the timeout is success.
    Udp(Vec<u8>),
    Grpc(GrpcCheck),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrpcCheck {
    /// `grpc.health.v1.Health/Check` for this service name ("" = the whole server).
    pub service: String,
    /// `None`: plaintext; `Some(None)`: TLS without verification; `Some(Some(v))`: verified TLS.
    pub tls: Option<Option<TlsVerify>>,
}

/// Certificate verification for a TLS probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsVerify {
    /// PEM certificates to trust (already checked to hold at least one).
    pub ca_pem: String,
    /// The name the certificate must carry; `None`: the host's IP address.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub https: bool,
    /// Always starts with `/`.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Only with `https`; `None` verifies nothing, like the kubelet.
    pub verify: Option<TlsVerify>,
}

impl Check {
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Tcp => "tcp",
            Check::Http(h) if h.https => "https",
            Check::Http(_) => "http",
            Check::Udp(_) => "udp",
            Check::Grpc(g) if g.tls.is_some() => "grpcs",
            Check::Grpc(_) => "grpc",
        }
    }
}

/// The whole desired state at one moment: what the sources say, and what was wrong with them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub definitions: BTreeMap<DefinitionKey, Definition>,
    pub problems: Vec<Problem>,
}

impl Definition {
    /// Whether this definition is meant for the named cluster.
    pub fn targets(&self, cluster: &str) -> bool {
        self.clusters
            .as_ref()
            .is_none_or(|c| c.iter().any(|n| n == cluster))
    }
}

/// Problems for definitions that name clusters the configuration does not have: such a
/// definition would otherwise silently go nowhere.
pub fn unknown_clusters<'a>(
    definitions: impl IntoIterator<Item = &'a Definition>,
    known: &[String],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for def in definitions {
        for (i, name) in def.clusters.iter().flatten().enumerate() {
            if !known.contains(name) {
                problems.push(Problem {
                    origin: def.origin.clone(),
                    field: format!("spec.clusters[{i}]"),
                    value: name.clone(),
                    reason: format!(
                        "no such cluster in the configuration (configured: {})",
                        known.join(", ")
                    ),
                });
            }
        }
    }
    problems
}
