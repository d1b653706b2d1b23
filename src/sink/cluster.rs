//! One target cluster: a loop that renders dirty definitions and applies only what changed. It
//! wakes on readiness changes, new desired state, drift in the cluster (our objects edited or
//! deleted by someone else) and retry deadlines. A failing definition backs off on its own; a
//! failing cluster never delays another cluster or the probes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::Client;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::apply::Writer;
use super::drift::{self, Notice};
use crate::model::{Definition, DefinitionKey, Desired};
use crate::probe::state::Readiness;
use crate::probe::{HealthBoard, TargetKey};
use crate::render::{self, Objects};
use futures::StreamExt;

/// What the status page shows about one cluster.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    /// Whether the API server answered the last request (`null` before the first one).
    pub connected: Option<bool>,
    #[serde(serialize_with = "crate::timefmt::rfc3339_opt")]
    pub last_successful_apply: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Definitions whose last apply failed and will be retried.
    pub pending: usize,
    /// The last apply error of each pending definition.
    pub errors: BTreeMap<String, String>,
    /// Definitions this daemon refuses to manage here, with the reason.
    pub conflicts: BTreeMap<String, String>,
    /// Create/update/delete calls made since start; stays flat while nothing changes.
    pub writes: u64,
    /// Definition applies that failed since start (each retry counts).
    pub apply_errors: u64,
}

/// The objects last applied for one definition: rendered content and the resourceVersion the
/// API server answered with.
#[derive(Default, Clone)]
pub(super) struct Applied {
    pub objects: HashMap<(&'static str, String), (serde_json::Value, String)>,
    pub slice_names: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SyncError {
    #[error(
        "Service {0} has a selector; it belongs to the endpoints controller and is left untouched"
    )]
    SelectorConflict(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("rendering: {0}")]
    Render(#[from] serde_json::Error),
}

pub struct ClusterSink {
    name: String,
    /// The API side: client, instance name (written into labels, required for pruning), status.
    writer: Writer,
    board: Arc<HealthBoard>,
    pub(super) applied: HashMap<DefinitionKey, Applied>,
    /// When each not-yet-applied definition was first seen, for [`Self::hold_back`].
    first_seen: HashMap<DefinitionKey, Instant>,
    /// Failing definitions: when to try again, how long the next wait will be, and whether the
    /// failure was the cluster being unreachable (as opposed to the API refusing the objects).
    retry: HashMap<DefinitionKey, Retry>,
    /// Definitions with objects of ours in the cluster but no definition any more.
    pub(super) orphans: BTreeSet<DefinitionKey>,
}

impl ClusterSink {
    pub fn new(name: String, instance: String, client: Client, board: Arc<HealthBoard>) -> Self {
        let status = ClusterStatus {
            name: name.clone(),
            ..Default::default()
        };
        let writer = Writer {
            name: name.clone(),
            client,
            instance,
            status: Arc::new(Mutex::new(status)),
        };
        ClusterSink {
            name,
            writer,
            orphans: BTreeSet::new(),
            board,
            applied: HashMap::new(),
            first_seen: HashMap::new(),
            retry: HashMap::new(),
        }
    }

    pub fn status(&self) -> Arc<Mutex<ClusterStatus>> {
        self.writer.status.clone()
    }

    fn update_status(&self, f: impl FnOnce(&mut ClusterStatus)) {
        f(&mut self.writer.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The objects for a definition with the readiness the engine sees now.
    fn render(&self, def: &Definition) -> Objects {
        render::render(def, &self.writer.instance, |port, host| {
            let key = TargetKey {
                definition: def.key.clone(),
                port: port.name.clone(),
                host,
            };
            self.board.readiness(&key) == Readiness::Ready
        })
    }

    /// Runs until the desired-state channel closes.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut changes: broadcast::Receiver<DefinitionKey>,
    ) {
        let (notices_tx, mut notices) = mpsc::channel(1024);
        drift::spawn(
            self.writer.client.clone(),
            &self.writer.instance,
            notices_tx,
        );
        let mut dirty = BTreeSet::new();
        let mut full = true;
        loop {
            let snapshot = desired.borrow_and_update().clone();
            if full {
                full = false;
                dirty.extend(snapshot.definitions.keys().cloned());
                dirty.extend(self.applied.keys().cloned());
            }
            let wake = self.pass(&snapshot, &mut dirty).await;
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
                Some(notice) = notices.recv() => self.drifted(notice, &mut dirty, &desired.borrow()),
                () = sleep_until_or_forever(wake) => {}
            }
            // Coalesce a burst of transitions and notices into one pass.
            loop {
                match changes.try_recv() {
                    Ok(key) => {
                        dirty.insert(key);
                    }
                    Err(broadcast::error::TryRecvError::Lagged(_)) => full = true,
                    Err(_) => break,
                }
            }
            while let Ok(notice) = notices.try_recv() {
                self.drifted(notice, &mut dirty, &desired.borrow());
            }
        }
    }

    /// A change the cluster reports: our own writes carry the resourceVersion we recorded and are
    /// ignored; anything else forgets the cached object so the next pass re-applies it.
    /// Objects of ours whose definition no longer exists (removed while the daemon was down,
    /// or never ours to keep) are pruned when they carry our instance and source labels.
    fn drifted(&mut self, notice: Notice, dirty: &mut BTreeSet<DefinitionKey>, desired: &Desired) {
        let Some(applied) = self.applied.get_mut(&notice.definition) else {
            let wanted = desired
                .definitions
                .get(&notice.definition)
                .is_some_and(|d| d.targets(&self.name));
            if notice.pruneable && notice.resource_version.is_some() && !wanted {
                self.orphans.insert(notice.definition.clone());
                dirty.insert(notice.definition);
            }
            return;
        };
        let cache_key = (notice.kind, notice.name.clone());
        let ours = applied.objects.get(&cache_key).map(|(_, version)| version);
        if notice.resource_version.is_some() && notice.resource_version.as_ref() == ours {
            return;
        }
        info!(cluster = %self.name, kind = notice.kind, name = %notice.name, deleted = notice.resource_version.is_none(), "managed object changed by someone else; re-applying");
        applied.objects.remove(&cache_key);
        dirty.insert(notice.definition);
    }

    /// Syncs (or removes) each dirty key that is due; keys that must wait stay in `dirty`.
    /// Returns when the loop must wake up on its own next.
    async fn pass(
        &mut self,
        snapshot: &Desired,
        dirty: &mut BTreeSet<DefinitionKey>,
    ) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut back_online = false;
        let mut later = |at: Instant| wake = Some(wake.map_or(at, |w| w.min(at)));
        // Decide what is due now; the writes then run concurrently, each definition with its
        // own cache entry moved out of the map and back in afterwards.
        let mut jobs = Vec::new();
        for key in std::mem::take(dirty) {
            let def = snapshot
                .definitions
                .get(&key)
                .filter(|d| d.targets(&self.name));
            let due = self
                .retry
                .get(&key)
                .map(|r| r.at)
                .filter(|at| *at > Instant::now());
            let held = def.and_then(|d| self.hold_back(d));
            if let Some(at) = due.or(held) {
                later(at);
                dirty.insert(key);
                continue;
            }
            let entry = self.applied.remove(&key);
            let job = match def {
                Some(def) => Job::Sync(Box::new((def.clone(), self.render(def))), entry),
                None if entry.is_some() || self.orphans.contains(&key) => Job::Remove,
                None => continue,
            };
            jobs.push((key, job));
        }
        let writer = self.writer.clone();
        let results: Vec<_> = futures::stream::iter(jobs)
            .map(|(key, job)| {
                let writer = writer.clone();
                async move {
                    match job {
                        Job::Sync(work, mut entry) => {
                            let (def, objects) = *work;
                            let result = writer.sync(&def, objects, &mut entry).await;
                            (key, result, entry)
                        }
                        Job::Remove => {
                            let result = writer.remove(&key).await;
                            (key, result, None)
                        }
                    }
                }
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (key, result, entry) in results {
            if let Some(entry) = entry {
                self.applied.insert(key.clone(), entry);
            }
            let name = key.to_string();
            match result {
                Ok(()) => {
                    self.first_seen.remove(&key);
                    self.orphans.remove(&key);
                    self.retry.remove(&key);
                    if !back_online {
                        back_online = self.retry.values().any(|r| r.unreachable);
                    }
                    self.update_status(|s| {
                        s.connected = Some(true);
                        s.conflicts.remove(&name);
                        s.errors.remove(&name);
                    });
                }
                Err(SyncError::SelectorConflict(svc)) => {
                    let reason = SyncError::SelectorConflict(svc).to_string();
                    warn!(cluster = %self.name, definition = %key, "{reason}");
                    self.update_status(|s| {
                        s.connected = Some(true);
                        s.conflicts.insert(name, reason);
                    });
                }
                Err(e) => {
                    let unreachable = e.is_unreachable();
                    let retry = self.retry.entry(key.clone()).or_default();
                    retry.at = Instant::now() + retry.backoff.next();
                    retry.unreachable = unreachable;
                    later(retry.at);
                    let error = error_chain(&e);
                    warn!(cluster = %self.name, definition = %key, %error, "apply failed; will retry");
                    self.update_status(|s| {
                        s.connected = Some(!unreachable);
                        s.last_error = Some(format!("{key}: {error}"));
                        s.errors.insert(name, error);
                        s.apply_errors += 1;
                    });
                    dirty.insert(key);
                }
            }
        }
        // The cluster answers again: everything that failed only because it was unreachable is
        // brought up to date in the next pass, not after each one's backoff.
        if back_online {
            for retry in self.retry.values_mut().filter(|r| r.unreachable) {
                retry.at = Instant::now();
                retry.backoff = Backoff::default();
            }
            later(Instant::now());
        }
        let pending = self.retry.len();
        self.update_status(|s| s.pending = pending);
        wake
    }

    /// A definition not yet applied here waits until each of its hosts has a first probe result
    /// (at most one period plus timeout), so it does not appear with every host not ready.
    /// Ports still in their initial delay do not hold it back: their hosts start not ready.
    fn hold_back(&mut self, def: &Definition) -> Option<Instant> {
        if self.applied.contains_key(&def.key) {
            return None;
        }
        let probed_now = || {
            def.ports
                .iter()
                .filter(|p| p.check.is_some() && p.timing.initial_delay.is_zero())
        };
        let grace = probed_now()
            .map(|p| p.timing.period + p.timing.timeout)
            .max()?;
        let until = *self
            .first_seen
            .entry(def.key.clone())
            .or_insert_with(Instant::now)
            + grace;
        let probed = probed_now().all(|p| {
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
}

/// An error with its causes, `outer: inner: root`, so "client error (Connect)" says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug)]
struct Retry {
    at: Instant,
    backoff: Backoff,
    unreachable: bool,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            at: Instant::now(),
            backoff: Backoff::default(),
            unreachable: false,
        }
    }
}

impl SyncError {
    /// No answer from the API server (as opposed to an answer refusing the request).
    fn is_unreachable(&self) -> bool {
        matches!(self, SyncError::Kube(e) if !matches!(e, kube::Error::Api(_)))
    }
}

/// Definitions written at once per cluster: enough to keep a burst of transitions moving,
/// few enough not to crowd the API server.
const WRITES_IN_FLIGHT: usize = 16;

/// One definition's work in a pass.
enum Job {
    Sync(Box<(Definition, Objects)>, Option<Applied>),
    Remove,
}

/// Exponential retry delay for a failing definition: 0.5 s doubling to 30 s.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(500).saturating_mul(1 << self.attempt.min(6));
        self.attempt += 1;
        delay.min(Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }
}
