//! Daemon configuration, layered: built-in defaults ← TOML file ← `ENDPOINTS_OPERATOR_*`
//! environment (nested keys joined by `__`, e.g. `ENDPOINTS_OPERATOR_STATUS__LISTEN`) ← flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/endpoints-operator/config.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this daemon in the labels of what it writes. Objects of a definition removed from
    /// the files are deleted only when they carry this name, so two daemons with different
    /// names can share a cluster without deleting each other's objects.
    #[serde(default = "default_instance")]
    pub instance: String,
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub sources: SourcesConfig,
    /// Target clusters. None listed: one cluster named `default` from the in-cluster
    /// service account, else `$KUBECONFIG` / `~/.kube/config` and its current context.
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
    #[serde(default)]
    pub probes: ProbesConfig,
    #[serde(default)]
    pub leader_election: LeaderElectionConfig,
}

fn default_instance() -> String {
    "default".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance: default_instance(),
            status: StatusConfig::default(),
            sources: SourcesConfig::default(),
            clusters: Vec::new(),
            probes: ProbesConfig::default(),
            leader_election: LeaderElectionConfig::default(),
        }
    }
}

/// Several daemons with the same `instance` (replicas, or bastion hosts side by side): in each
/// target cluster only the holder of a Lease writes; the others probe and wait to take over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElectionConfig {
    pub enabled: bool,
    /// Namespace of the Lease in each target cluster; default: the daemon's own namespace when
    /// it runs in a cluster, else `default`.
    pub namespace: Option<String>,
    /// How long a Lease holds without renewal: the longest a dead leader goes unnoticed.
    pub lease_seconds: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            enabled: false,
            namespace: None,
            lease_seconds: 15,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Address of the status page, JSON API and health endpoints.
    pub listen: SocketAddr,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9480)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// Files, or folders of `*.yaml` / `*.yml` / `*.toml`, holding ClusterEndpoint definitions.
    /// Relative paths are taken from the config file's folder.
    pub paths: Vec<PathBuf>,
    /// Also watch ClusterEndpoint objects in the target clusters.
    #[serde(default)]
    pub crd: bool,
    /// Namespaces whose ClusterEndpoint objects are watched; empty: all of them.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            paths: vec![PathBuf::from("/etc/endpoints-operator/endpoints.d")],
            crd: false,
            namespaces: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// Default: `$KUBECONFIG`, then `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Default: the kubeconfig's current context.
    pub context: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesConfig {
    /// Probes in flight at once, across all targets. Default: as many as the open-files limit
    /// allows (see [`crate::probe::probe_slots`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: not found")]
    Missing(PathBuf),
    #[error("config file {0}: the file is empty")]
    Empty(PathBuf),
    /// Every error of the layered config, one per line (see [`describe`]).
    #[error("{0}")]
    Invalid(String),
    #[error("{file}: {field} = {value:?}: {reason}")]
    Field {
        file: String,
        field: String,
        value: String,
        reason: String,
    },
}

/// Environment variables of the config layer: `ENDPOINTS_OPERATOR_STATUS__LISTEN`, say.
const ENV_PREFIX: &str = "ENDPOINTS_OPERATOR_";

/// Loads the layered configuration. An explicitly named file must exist; the default path
/// may be absent (defaults and environment then stand alone).
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let (file, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    if explicit && !file.exists() {
        return Err(ConfigError::Missing(file));
    }
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if file.exists() {
        figment = figment.merge(Toml::file_exact(&file));
    }
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .filter(|k| k != "config")
            .split("__"),
    );
    if let Some(listen) = overrides.listen {
        figment = figment.merge(Serialized::default("status.listen", listen));
    }
    let mut config: Config = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(describe(&e, &figment)))?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    for p in &mut config.sources.paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    for c in &mut config.clusters {
        if let Some(k) = c.kubeconfig.as_mut().filter(|k| k.is_relative()) {
            *k = base.join(&*k);
        }
    }
    validate(&config, &file.display().to_string())?;
    Ok(config)
}

/// One line per error: where the value came from (the file, or the environment variable by
/// name), the key, the value found there, and what is wrong with it.
fn describe(error: &figment::Error, figment: &Figment) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| {
            // figment prefixes every key with its profile name; users never see profiles.
            let path: Vec<String> = (e.path.iter())
                .filter(|p| p.as_str() != "default")
                .cloned()
                .collect();
            let key = path.join(".");
            let source = match &e.metadata {
                // The environment layer (the only one without a source): name the variable.
                Some(m) if m.source.is_none() && !path.is_empty() => {
                    format!("{ENV_PREFIX}{}", path.join("__").to_uppercase())
                }
                Some(m) => m
                    .source
                    .as_ref()
                    .map_or_else(|| m.name.to_string(), |s| s.to_string()),
                None => "config".to_string(),
            };
            let kind = match &e.kind {
                figment::error::Kind::UnknownField(found, expected) => {
                    format!(
                        "unknown key `{found}`; expected one of {}",
                        expected.join(", ")
                    )
                }
                // Parser messages span several lines with a caret picture; logs want one.
                other => other
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            let value = (!key.is_empty())
                .then(|| figment.find_value(&key).ok())
                .flatten()
                .and_then(|v| serde_json::to_string(&v).ok());
            let is_env = e.metadata.as_ref().is_some_and(|m| m.source.is_none());
            match (key.is_empty(), value) {
                (true, _) => format!("{source}: {kind}"),
                (false, Some(value)) if is_env => format!("{source} = {value}: {kind}"),
                (false, Some(value)) => format!("{source}: {key} = {value}: {kind}"),
                (false, None) => format!("{source}: {key}: {kind}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn validate(config: &Config, file: &str) -> Result<(), ConfigError> {
    let label_value = |v: &str| {
        !v.is_empty()
            && v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !label_value(&config.instance) {
        return Err(ConfigError::Field {
            file: file.into(),
            field: "instance".into(),
            value: config.instance.clone(),
            reason: "must be a label value: 1-63 letters, digits, '-', '_' or '.'".into(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for (i, c) in config.clusters.iter().enumerate() {
        let field = format!("clusters[{i}].name");
        if c.name.is_empty() {
            return Err(ConfigError::Field {
                file: file.into(),
                field,
                value: c.name.clone(),
                reason: "a cluster needs a name".into(),
            });
        }
        if !seen.insert(&c.name) {
            return Err(ConfigError::Field {
                file: file.into(),
                field,
                value: c.name.clone(),
                reason: "duplicate cluster name".into(),
            });
        }
    }
    if config.probes.concurrency == Some(0) {
        return Err(ConfigError::Field {
            file: file.into(),
            field: "probes.concurrency".into(),
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    // The holder renews 5 s before expiry (kube-lease-manager's grace), so less leaves no room.
    let lease = config.leader_election.lease_seconds;
    if lease < 10 {
        return Err(ConfigError::Field {
            file: file.into(),
            field: "leader_election.lease_seconds".into(),
            value: lease.to_string(),
            reason: "must be at least 10".into(),
        });
    }
    Ok(())
}

/// Checks, without any network use, that a cluster's kubeconfig can be read and has the context.
pub fn check_kubeconfig(cluster: &ClusterConfig) -> Result<(), String> {
    let Some(path) = &cluster.kubeconfig else {
        return Ok(());
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
        // kube's own message repeats the path, quoted twice; its cause is what matters.
        let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), |c| c.to_string());
        format!("kubeconfig {}: {cause}", path.display())
    })?;
    let context = cluster
        .context
        .clone()
        .or(kubeconfig.current_context.clone());
    match context {
        Some(name) if kubeconfig.contexts.iter().any(|c| c.name == name) => Ok(()),
        Some(name) => Err(format!(
            "kubeconfig {} has no context {name:?}",
            path.display()
        )),
        None => Err(format!(
            "kubeconfig {} has no current-context; set `context`",
            path.display()
        )),
    }
}

impl Config {
    /// The configured clusters, or the implicit one when none is listed.
    pub fn target_clusters(&self) -> Vec<ClusterConfig> {
        if self.clusters.is_empty() {
            vec![ClusterConfig {
                name: "default".into(),
                kubeconfig: None,
                context: None,
            }]
        } else {
            self.clusters.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a test with the environment guarded: the layering test sets ENDPOINTS_OPERATOR_*
    /// variables, which would otherwise leak into tests running beside it.
    #[allow(clippy::result_large_err)]
    fn isolated(test: impl FnOnce()) {
        figment::Jail::expect_with(|_| {
            test();
            Ok(())
        });
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_file_overrides_defaults_and_relative_paths_follow_the_file() {
        isolated(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = write(
                dir.path(),
                "[sources]\npaths = [\"endpoints.d\"]\n[[clusters]]\nname = \"east\"\nkubeconfig = \"kc\"\n",
            );
            let config = load(Some(&path), &Overrides::default()).unwrap();
            assert_eq!(config.status.listen, "127.0.0.1:9480".parse().unwrap());
            assert_eq!(config.sources.paths, [dir.path().join("endpoints.d")]);
            assert_eq!(config.clusters[0].kubeconfig, Some(dir.path().join("kc")));
        });
    }

    #[test]
    fn flags_win_over_the_file() {
        isolated(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "[status]\nlisten = \"127.0.0.1:1\"\n");
            let overrides = Overrides {
                listen: Some("127.0.0.1:2".parse().unwrap()),
            };
            assert_eq!(
                load(Some(&path), &overrides).unwrap().status.listen,
                "127.0.0.1:2".parse().unwrap()
            );
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        isolated(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "[status]\nlisen = \"127.0.0.1:1\"\n");
            let err = load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.ends_with(
                    "status.lisen = \"127.0.0.1:1\": unknown key `lisen`; expected one of listen"
                ),
                "{err}"
            );
            let err = load(Some(&dir.path().join("nope.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("nope.toml"), "{err}");
        });
    }

    #[test]
    // figment's Jail closure must return figment's own (large) error type.
    #[allow(clippy::result_large_err)]
    fn a_bad_value_names_its_file_or_variable_key_and_value() {
        figment::Jail::expect_with(|jail| {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "[status]\nlisten = \"nope\"\n");
            let err = load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            // figment shows the file relative to the working folder.
            let expected = "config.toml: status.listen = \"nope\": invalid socket address syntax";
            assert!(err.ends_with(expected), "{err}");
            let path = write(dir.path(), "instance = \"a\"\n");
            jail.set_env("ENDPOINTS_OPERATOR_PROBES__CONCURRENCY", "many");
            let err = load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("ENDPOINTS_OPERATOR_PROBES__CONCURRENCY = \"many\": "),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn duplicate_cluster_names_are_rejected() {
        isolated(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = write(
                dir.path(),
                "[[clusters]]\nname = \"a\"\n[[clusters]]\nname = \"a\"\n",
            );
            let err = load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("clusters[1].name") && err.contains("duplicate"),
                "{err}"
            );
        });
    }

    #[test]
    // figment's Jail closure must return figment's own (large) error type.
    #[allow(clippy::result_large_err)]
    fn layers_are_defaults_then_file_then_environment_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("config.toml", "instance = \"bastion\"\n[status]\nlisten = \"127.0.0.1:1\"\n[probes]\nconcurrency = 5\n")?;
            jail.set_env("ENDPOINTS_OPERATOR_STATUS__LISTEN", "127.0.0.1:2");
            jail.set_env("ENDPOINTS_OPERATOR_PROBES__CONCURRENCY", "7");
            let path = jail.directory().join("config.toml");
            let config = load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.instance, "bastion", "file over default");
            assert_eq!(
                config.status.listen,
                "127.0.0.1:2".parse().unwrap(),
                "environment over file"
            );
            assert_eq!(config.probes.concurrency, Some(7));
            let flags = Overrides {
                listen: Some("127.0.0.1:3".parse().unwrap()),
            };
            let config = load(Some(&path), &flags).map_err(|e| e.to_string())?;
            assert_eq!(
                config.status.listen,
                "127.0.0.1:3".parse().unwrap(),
                "flag over environment"
            );
            Ok(())
        });
    }
}
