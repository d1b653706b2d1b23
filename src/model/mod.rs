//! The desired state: validated `ClusterEndpoint` definitions, free of Kubernetes and I/O.
//! Everything downstream (probe engine, renderer, sinks, status) trusts these types.

pub mod crd;
pub mod spec;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use validate::{API_VERSION, KIND, Problem, validate};

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

/// Where a definition comes from. Part of its identity: one namespace/name may be defined by a
/// file and by objects in several clusters at the same time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Source {
    File,
    /// A `ClusterEndpoint` object in the named cluster.
    Object {
        cluster: String,
    },
}

/// A definition's identity: the Service it produces and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct DefinitionId {
    pub key: DefinitionKey,
    pub source: Source,
}

impl fmt::Display for DefinitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::File => write!(f, "{}", self.key),
            Source::Object { cluster } => write!(f, "{} (object in {cluster})", self.key),
        }
    }
}

/// The `ClusterEndpoint` object a definition was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub uid: String,
    pub generation: Option<i64>,
}

/// A `ClusterEndpoint` object as listed, valid or not: what its status is written from.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectState {
    pub info: ObjectInfo,
    pub problems: Vec<Problem>,
    /// The status it carries now.
    pub status: Option<crd::ClusterEndpointStatus>,
}

/// A validated definition. Invalid hosts and ports have already been dropped (and reported).
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub key: DefinitionKey,
    pub source: Source,
    /// Set for definitions read from an object.
    pub object: Option<ObjectInfo>,
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
    pub definitions: BTreeMap<DefinitionId, Definition>,
    pub problems: Vec<Problem>,
    /// Every `ClusterEndpoint` object listed, also those without a usable definition.
    pub objects: BTreeMap<DefinitionId, ObjectState>,
    /// Whether every object source has listed its cluster's objects. Until then a missing
    /// object-defined definition may just not be known yet, so nothing is pruned for it.
    pub objects_complete: bool,
    /// Services named by files or objects that cannot be used now and have no last good
    /// version (typically right after a start): what a cluster has of them stays as it is.
    pub unusable: Unusable,
}

/// Definitions that exist but cannot be used. Their Services are never pruned: bad input must
/// not take away what is applied, also when no earlier version is known to fall back on.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Unusable {
    pub keys: BTreeSet<DefinitionKey>,
    /// A file or folder that cannot be read at all, which may name any Service.
    pub any: bool,
}

impl Unusable {
    pub fn merge(&mut self, other: Unusable) {
        self.keys.extend(other.keys);
        self.any |= other.any;
    }

    /// Whether the objects of this Service must be left in place; `from_files` when they were
    /// written for a file (an unreadable file says nothing about objects' Services).
    pub fn holds(&self, key: &DefinitionKey, from_files: bool) -> bool {
        self.keys.contains(key) || (self.any && from_files)
    }
}

impl Desired {
    /// The definitions of one Service that target a cluster, in precedence order: a file first
    /// (the host's configuration outranks what anyone with access to a namespace can create),
    /// then the object in that cluster, then objects of other clusters by cluster name.
    pub fn candidates<'a>(&'a self, cluster: &str, key: &DefinitionKey) -> Vec<&'a Definition> {
        let from = DefinitionId {
            key: key.clone(),
            source: Source::File,
        };
        let mut found: Vec<&Definition> = self
            .definitions
            .range(from..)
            .take_while(|(id, _)| id.key == *key)
            .map(|(_, def)| def)
            .filter(|def| def.targets(cluster))
            .collect();
        found.sort_by_key(|def| match &def.source {
            Source::File => (0, ""),
            Source::Object { cluster: c } if c == cluster => (1, ""),
            Source::Object { cluster: c } => (2, c.as_str()),
        });
        found
    }

    /// The definition that a cluster's Service follows.
    pub fn winner(&self, cluster: &str, key: &DefinitionKey) -> Option<&Definition> {
        self.candidates(cluster, key).into_iter().next()
    }

    /// A problem for every definition that loses to another in some cluster.
    pub fn overlaps(&self, clusters: &[String]) -> Vec<Problem> {
        let keys: BTreeSet<&DefinitionKey> = self.definitions.keys().map(|id| &id.key).collect();
        let mut problems = Vec::new();
        for key in keys {
            for cluster in clusters {
                let candidates = self.candidates(cluster, key);
                let Some((winner, losers)) = candidates.split_first() else {
                    continue;
                };
                for loser in losers {
                    problems.push(Problem {
                        origin: loser.origin.clone(),
                        field: "metadata.name".into(),
                        value: key.to_string(),
                        reason: format!(
                            "conflict: in cluster {cluster} the Service follows {} instead",
                            winner.origin
                        ),
                    });
                }
            }
        }
        problems
    }
}

impl Definition {
    pub fn id(&self) -> DefinitionId {
        DefinitionId {
            key: self.key.clone(),
            source: self.source.clone(),
        }
    }

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
        for name in def.clusters.iter().flatten() {
            if !known.contains(name) {
                problems.push(Problem {
                    origin: def.origin.clone(),
                    field: "spec.clusters".into(),
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
