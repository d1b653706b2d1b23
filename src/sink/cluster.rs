//! One target cluster: renders dirty definitions and applies only what changed since the last
//! successful apply. A failing cluster retries with backoff on its own task and never delays
//! another cluster or the probes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};

use crate::config::ClusterConfig;
use crate::model::{Definition, DefinitionKey, Desired};
use crate::probe::HealthBoard;
use crate::probe::TargetKey;
use crate::probe::state::Readiness;
use crate::render::{
    self, FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SERVICE_NAME_LABEL, SLICE_CONTROLLER,
    SLICE_MANAGED_BY_LABEL,
};

/// What the status page shows about one cluster.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    #[serde(serialize_with = "crate::timefmt::rfc3339_opt")]
    pub last_successful_apply: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Definitions whose last apply failed and will be retried.
    pub pending: usize,
    /// Definitions this daemon refuses to manage here, with the reason.
    pub conflicts: BTreeMap<String, String>,
    /// Create/update/delete calls made since start; stays flat while nothing changes.
    pub writes: u64,
}

/// Builds a client for one configured cluster; no request is made yet.
pub async fn connect(cluster: &ClusterConfig) -> anyhow::Result<Client> {
    let mut config = match (&cluster.kubeconfig, &cluster.context) {
        (None, None) => kube::Config::infer().await?,
        (path, context) => {
            let kubeconfig = match path {
                Some(p) => Kubeconfig::read_from(p)
                    .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", p.display()))?,
                None => Kubeconfig::read()?,
            };
            let options = KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
    };
    // A hung API server must cost one bounded wait, not a stuck sink.
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(15));
    config.write_timeout = Some(Duration::from_secs(15));
    Ok(Client::try_from(config)?)
}

/// Names of the objects last applied for one definition, with their rendered content.
#[derive(Default)]
struct Applied {
    objects: HashMap<(&'static str, String), serde_json::Value>,
    slice_names: BTreeSet<String>,
}

pub struct ClusterSink {
    name: String,
    client: Client,
    board: Arc<HealthBoard>,
    status: Arc<Mutex<ClusterStatus>>,
    applied: HashMap<DefinitionKey, Applied>,
    /// When each not-yet-applied definition was first seen, for [`Self::hold_back`].
    first_seen: HashMap<DefinitionKey, Instant>,
}

/// The outcome of one pass over dirty definitions.
#[derive(Default)]
struct Pass {
    failed: BTreeSet<DefinitionKey>,
    held: BTreeSet<DefinitionKey>,
    held_until: Option<Instant>,
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(
        "Service {0} has a selector; it belongs to the endpoints controller and is left untouched"
    )]
    SelectorConflict(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("rendering: {0}")]
    Render(#[from] serde_json::Error),
}

impl ClusterSink {
    pub fn new(name: String, client: Client, board: Arc<HealthBoard>) -> Self {
        let status = ClusterStatus {
            name: name.clone(),
            ..Default::default()
        };
        ClusterSink {
            name,
            client,
            board,
            status: Arc::new(Mutex::new(status)),
            applied: HashMap::new(),
            first_seen: HashMap::new(),
        }
    }

    pub fn status(&self) -> Arc<Mutex<ClusterStatus>> {
        self.status.clone()
    }

    fn update_status(&self, f: impl FnOnce(&mut ClusterStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs until the desired-state channel closes.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut changes: broadcast::Receiver<DefinitionKey>,
    ) {
        let mut dirty = BTreeSet::new();
        let mut full = true;
        let mut backoff = Backoff::default();
        loop {
            let snapshot = desired.borrow_and_update().clone();
            if full {
                full = false;
                dirty.extend(snapshot.definitions.keys().cloned());
                dirty.extend(self.applied.keys().cloned());
            }
            let pass = self.pass(&snapshot, std::mem::take(&mut dirty)).await;
            self.update_status(|s| s.pending = pass.failed.len());
            let retry = if pass.failed.is_empty() {
                backoff.reset();
                None
            } else {
                Some(Instant::now() + backoff.next())
            };
            let wake = retry.into_iter().chain(pass.held_until).min();
            dirty = pass.failed;
            dirty.extend(pass.held);
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() { return; }
                    full = true;
                }
                key = changes.recv() => match key {
                    Ok(key) => { dirty.insert(key); }
                    Err(broadcast::error::RecvError::Lagged(_)) => full = true,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = sleep_until_or_forever(wake) => {}
            }
            // Coalesce a burst of transitions into one pass.
            loop {
                match changes.try_recv() {
                    Ok(key) => {
                        dirty.insert(key);
                    }
                    Err(broadcast::error::TryRecvError::Lagged(_)) => full = true,
                    Err(_) => break,
                }
            }
        }
    }

    /// Syncs (or removes) each key once; reports what failed and what is held back.
    async fn pass(&mut self, snapshot: &Desired, keys: BTreeSet<DefinitionKey>) -> Pass {
        let mut pass = Pass::default();
        for key in keys {
            let def = snapshot
                .definitions
                .get(&key)
                .filter(|d| d.targets(&self.name));
            if let Some(def) = def
                && let Some(until) = self.hold_back(def)
            {
                pass.held.insert(key);
                pass.held_until = Some(pass.held_until.map_or(until, |t| t.min(until)));
                continue;
            }
            let result = match def {
                Some(def) => self.sync(def).await,
                None => self.remove(&key).await,
            };
            match result {
                Ok(()) => {
                    self.first_seen.remove(&key);
                    self.update_status(|s| {
                        s.conflicts.remove(&key.to_string());
                    });
                }
                Err(SyncError::SelectorConflict(svc)) => {
                    let reason = SyncError::SelectorConflict(svc).to_string();
                    warn!(cluster = %self.name, definition = %key, "{reason}");
                    self.update_status(|s| {
                        s.conflicts.insert(key.to_string(), reason);
                    });
                }
                Err(e) => {
                    warn!(cluster = %self.name, definition = %key, error = %e, "apply failed; will retry");
                    self.update_status(|s| s.last_error = Some(format!("{key}: {e}")));
                    pass.failed.insert(key);
                }
            }
        }
        pass
    }

    /// A definition not yet applied here waits until each of its hosts has a first probe result
    /// (at most one period plus timeout), so it does not appear with every host not ready.
    fn hold_back(&mut self, def: &Definition) -> Option<Instant> {
        if self.applied.contains_key(&def.key) {
            return None;
        }
        let grace = def
            .ports
            .iter()
            .filter(|p| p.check.is_some())
            .map(|p| p.timing.initial_delay + p.timing.period + p.timing.timeout)
            .max()?;
        let until = *self
            .first_seen
            .entry(def.key.clone())
            .or_insert_with(Instant::now)
            + grace;
        let probed = def.ports.iter().filter(|p| p.check.is_some()).all(|p| {
            p.hosts.iter().all(|h| {
                self.board.probed(&TargetKey {
                    definition: def.key.clone(),
                    port: p.name.clone(),
                    host: *h,
                })
            })
        });
        (!probed && Instant::now() < until).then_some(until)
    }

    #[instrument(skip_all, fields(cluster = %self.name, definition = %def.key))]
    async fn sync(&mut self, def: &Definition) -> Result<(), SyncError> {
        let board = self.board.clone();
        let objects = render::render(def, |port, host| {
            let key = TargetKey {
                definition: def.key.clone(),
                port: port.name.clone(),
                host,
            };
            board.readiness(&key) == Readiness::Ready
        });
        let ns = &def.key.namespace;
        let first = !self.applied.contains_key(&def.key);
        if first {
            let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
            if let Some(existing) = services.get_opt(&def.key.name).await?
                && existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|s| !s.is_empty())
            {
                return Err(SyncError::SelectorConflict(def.key.to_string()));
            }
        }
        self.apply(def, objects.service).await?;
        let slice_names: BTreeSet<String> = objects
            .slices
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        for slice in objects.slices {
            self.apply(def, slice).await?;
        }
        self.apply(def, objects.endpoints).await?;
        let previous = self.applied.get(&def.key).map(|a| a.slice_names.clone());
        if previous.as_ref() != Some(&slice_names) {
            self.prune_slices(&def.key, &slice_names).await?;
        }
        self.applied.entry(def.key.clone()).or_default().slice_names = slice_names;
        self.update_status(|s| s.last_successful_apply = Some(SystemTime::now()));
        Ok(())
    }

    /// Server-side apply, skipped when the rendered object equals the last one applied.
    async fn apply<K>(&mut self, def: &Definition, object: K) -> Result<(), SyncError>
    where
        K: k8s_openapi::Resource
            + Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Serialize
            + DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let rendered = serde_json::to_value(&object)?;
        let cache_key = (K::KIND, name.clone());
        if self
            .applied
            .get(&def.key)
            .and_then(|a| a.objects.get(&cache_key))
            == Some(&rendered)
        {
            return Ok(());
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &def.key.namespace);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
        debug!(kind = K::KIND, %name, "applied");
        self.update_status(|s| s.writes += 1);
        self.applied
            .entry(def.key.clone())
            .or_default()
            .objects
            .insert(cache_key, rendered);
        Ok(())
    }

    async fn prune_slices(
        &mut self,
        key: &DefinitionKey,
        keep: &BTreeSet<String>,
    ) -> Result<(), SyncError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.namespace);
        let selector = format!(
            "{SERVICE_NAME_LABEL}={},{SLICE_MANAGED_BY_LABEL}={SLICE_CONTROLLER}",
            key.name
        );
        for slice in api.list(&ListParams::default().labels(&selector)).await? {
            let name = slice.metadata.name.unwrap_or_default();
            if !keep.contains(&name) {
                api.delete(&name, &DeleteParams::default()).await?;
                info!(cluster = %self.name, definition = %key, slice = %name, "deleted stale EndpointSlice");
                self.update_status(|s| s.writes += 1);
            }
        }
        Ok(())
    }

    /// Deletes what this daemon applied for a definition that is gone (or no longer targets us).
    async fn remove(&mut self, key: &DefinitionKey) -> Result<(), SyncError> {
        if self.applied.contains_key(key) {
            self.delete_if_ours::<Service>(key).await?;
            self.delete_if_ours::<Endpoints>(key).await?;
            self.prune_slices(key, &BTreeSet::new()).await?;
            info!(cluster = %self.name, definition = %key, "removed objects of a deleted definition");
        }
        self.applied.remove(key);
        Ok(())
    }

    async fn delete_if_ours<K>(&mut self, key: &DefinitionKey) -> Result<(), SyncError>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &key.namespace);
        let Some(existing) = api.get_opt(&key.name).await? else {
            return Ok(());
        };
        let ours = existing
            .meta()
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY_VALUE);
        if ours {
            api.delete(&key.name, &DeleteParams::default()).await?;
            self.update_status(|s| s.writes += 1);
        }
        Ok(())
    }
}

/// Exponential retry delay for a failing cluster: 0.5 s doubling to 30 s.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(500).saturating_mul(1 << self.attempt.min(6));
        self.attempt += 1;
        delay.min(Duration::from_secs(30))
    }
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(500));
    }
}
