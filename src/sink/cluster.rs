//! One target cluster: a loop that renders dirty definitions and applies only what changed. It
//! wakes on readiness changes, new desired state, drift in the cluster (our objects edited or
//! deleted by someone else) and retry deadlines. A failing definition backs off on its own; a
//! failing cluster never delays another cluster or the probes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::Client;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::apply::{Synced, Writer};
use super::drift::{self, Notice};
use super::events::Events;
use crate::model::crd::ClusterEndpointStatus;
use crate::model::{Definition, DefinitionId, DefinitionKey, Desired, Port, Source};
use crate::probe::state::Readiness;
use crate::probe::{HealthBoard, TargetKey};
use crate::render::{self, Objects, SOURCE_FILE, SOURCE_LABEL, pruneable};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

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
    /// With leader election: whether this daemon holds the cluster's Lease and writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leading: Option<bool>,
    /// Definition applies that failed since start (each retry counts).
    pub apply_errors: u64,
}

/// The objects last applied for one definition: rendered content and the resourceVersion the
/// API server answered with.
#[derive(Default, Clone)]
pub(super) struct Applied {
    pub objects: HashMap<(&'static str, String), (serde_json::Value, String)>,
    pub slice_names: BTreeSet<String>,
    /// The definition these objects were last rendered from.
    pub by: Option<DefinitionId>,
    /// The `clusterIP` last applied (`None`: allocated by the API server).
    pub cluster_ip: Option<String>,
    /// The Service's uid, for Events about it.
    pub service_uid: Option<String>,
    /// Host readiness as last applied, per (port, host), for Events on transitions.
    pub published: BTreeMap<(String, IpAddr), bool>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SyncError {
    #[error(
        "Service {0} has a selector; it belongs to the endpoints controller and is left untouched"
    )]
    SelectorConflict(String),
    #[error(
        "Service {0} is managed by endpoints-operator instance {1:?}; left untouched (give both daemons the same instance, or relabel it)"
    )]
    OtherInstance(String, String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("rendering: {0}")]
    Render(#[from] serde_json::Error),
}

pub struct ClusterSink {
    pub(super) name: String,
    /// The API side: client, instance name (written into labels, required for pruning), status.
    pub(super) writer: Writer,
    pub(super) board: Arc<HealthBoard>,
    pub(super) events: Events,
    /// Per Service: the objects last applied.
    pub(super) applied: HashMap<DefinitionKey, Applied>,
    /// When each definition not yet applied was first seen, for [`Self::hold_back`].
    first_seen: HashMap<DefinitionId, Instant>,
    /// The status last written to (or read from) each `ClusterEndpoint` in this cluster.
    /// Kept with the object's uid: a deleted and re-created object of the same name starts
    /// from its own (empty) status, not from the one written to its predecessor.
    pub(super) statuses: HashMap<DefinitionKey, (String, ClusterEndpointStatus)>,
    /// Objects of ours without a definition that may not be pruned yet: from `ClusterEndpoint`s
    /// before every object was listed, or of a definition that is there but unusable. Looked at
    /// again on every full pass.
    suspects: BTreeSet<DefinitionKey>,
    /// Failing definitions: when to try again, how long the next wait will be, and whether the
    /// failure was the cluster being unreachable (as opposed to the API refusing the objects).
    retry: HashMap<DefinitionKey, Retry>,
    /// Refused Services (a selector, another instance): looked at again with backoff, since what
    /// refused them can go away without any event this daemon watches.
    recheck: HashMap<DefinitionKey, Retry>,
    /// Definitions with objects of ours in the cluster but no definition any more.
    pub(super) orphans: BTreeSet<DefinitionKey>,
}

impl ClusterSink {
    /// A sink reporting into `status` (kept by the caller, so it outlives a sink that stops when
    /// leadership is lost).
    pub fn new(
        name: String,
        instance: String,
        client: Client,
        board: Arc<HealthBoard>,
        status: Arc<Mutex<ClusterStatus>>,
    ) -> Self {
        let events = Events::new(client.clone(), &instance);
        let writer = Writer {
            name: name.clone(),
            client,
            instance,
            status,
        };
        ClusterSink {
            name,
            writer,
            events,
            orphans: BTreeSet::new(),
            suspects: BTreeSet::new(),
            board,
            applied: HashMap::new(),
            first_seen: HashMap::new(),
            statuses: HashMap::new(),
            retry: HashMap::new(),
            recheck: HashMap::new(),
        }
    }

    pub(super) fn update_status(&self, f: impl FnOnce(&mut ClusterStatus)) {
        f(&mut self.writer.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The objects for a definition with the readiness the engine sees now. Only a
    /// `ClusterEndpoint` in this cluster that is the sole definition of its Service owns them:
    /// with another definition behind it, deleting the object must hand over, not delete.
    fn render(&self, def: &Definition, alone: bool) -> Objects {
        let local = def.source
            == Source::Object {
                cluster: self.name.clone(),
            };
        let owner = (alone && local)
            .then(|| render::owner_reference(def))
            .flatten();
        render::render(def, &self.writer.instance, owner.as_ref(), |port, host| {
            self.ready(def, port, host)
        })
    }

    pub(super) fn ready(&self, def: &Definition, port: &Port, host: IpAddr) -> bool {
        port.check.is_none()
            || self.board.readiness(&TargetKey {
                definition: def.id(),
                port: port.name.clone(),
                host,
            }) == Readiness::Ready
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
                dirty.extend(snapshot.definitions.keys().map(|id| id.key.clone()));
                dirty.extend(self.applied.keys().cloned());
                let local = |id: &DefinitionId| id.source == self.local_source();
                dirty.extend(
                    snapshot
                        .objects
                        .keys()
                        .filter(|id| local(id))
                        .map(|id| id.key.clone()),
                );
                self.statuses.retain(|key, _| {
                    snapshot.objects.contains_key(&DefinitionId {
                        key: key.clone(),
                        source: Source::Object {
                            cluster: self.name.clone(),
                        },
                    })
                });
                if snapshot.objects_complete {
                    self.orphans.append(&mut self.suspects);
                    dirty.extend(self.orphans.iter().cloned());
                }
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
            let wanted = desired.winner(&self.name, &notice.definition).is_some();
            if wanted || notice.resource_version.is_none() {
                return;
            }
            let instance = &self.writer.instance;
            let labels = Some(&notice.labels);
            let from_files = notice
                .labels
                .get(SOURCE_LABEL)
                .is_some_and(|s| s == SOURCE_FILE);
            let kept = desired.unusable.holds(&notice.definition, from_files);
            if pruneable(labels, instance, desired.objects_complete) && !kept {
                self.orphans.insert(notice.definition.clone());
                dirty.insert(notice.definition);
            } else if pruneable(labels, instance, true) {
                self.suspects.insert(notice.definition);
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
    /// Then the status of each `ClusterEndpoint` in this cluster among those keys is brought up
    /// to date. Returns when the loop must wake up on its own next.
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
        let mut outcomes: BTreeMap<DefinitionKey, Outcome> = BTreeMap::new();
        for key in std::mem::take(dirty) {
            let candidates = snapshot.candidates(&self.name, &key);
            let winner = candidates.first().copied();
            let due = (self.retry.get(&key).or(self.recheck.get(&key)))
                .map(|r| r.at)
                .filter(|at| *at > Instant::now());
            let held = winner.and_then(|d| self.hold_back(d));
            if let Some(at) = due.or(held) {
                later(at);
                if held.is_some() {
                    outcomes.insert(key.clone(), Outcome::Waiting);
                }
                dirty.insert(key);
                continue;
            }
            let entry = self.applied.remove(&key);
            let job = match winner {
                Some(def) => {
                    let objects = self.render(def, candidates.len() == 1);
                    let published = self.published(def);
                    Job::Sync(Box::new(SyncWork {
                        def: def.clone(),
                        objects,
                        published,
                        entry,
                    }))
                }
                None if snapshot.unusable.holds(&key, entry_from_files(&entry)) => {
                    // Looked at again on the next full pass, when it may have become usable.
                    if self.orphans.remove(&key) {
                        self.suspects.insert(key.clone());
                    }
                    if let Some(entry) = entry {
                        self.applied.insert(key.clone(), entry);
                    }
                    outcomes.insert(key, Outcome::Nothing);
                    continue;
                }
                None if entry.is_some() || self.orphans.contains(&key) => Job::Remove,
                None => {
                    // Nothing of ours there: a refusal of it is no longer news.
                    self.recheck.remove(&key);
                    self.update_status(|s| {
                        s.conflicts.remove(&key.to_string());
                    });
                    outcomes.insert(key, Outcome::Nothing);
                    continue;
                }
            };
            jobs.push((key, job));
        }
        let writer = self.writer.clone();
        let complete = snapshot.objects_complete;
        let results: Vec<_> = futures::stream::iter(jobs)
            .map(|(key, job)| {
                let writer = writer.clone();
                async move {
                    match job {
                        Job::Sync(work) => {
                            let SyncWork {
                                def,
                                objects,
                                published,
                                mut entry,
                            } = *work;
                            let result = writer.sync(&def, objects.clone(), &mut entry).await;
                            let done = entry.as_ref().map(|e| e.holds(&objects));
                            if let Some(entry) = entry.as_mut() {
                                entry.by = Some(def.id());
                            }
                            (
                                key,
                                result.map(|s| (s, Some((def, published)))),
                                entry,
                                done,
                            )
                        }
                        Job::Remove => {
                            let result = writer.remove(&key, complete).await;
                            (key, result.map(|()| (Synced::default(), None)), None, None)
                        }
                    }
                }
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (key, result, mut entry, done) in results {
            let name = key.to_string();
            let (service, endpoints) = done.unwrap_or((false, false));
            match result {
                Ok((synced, work)) => {
                    if let (Some(entry), Some((def, published))) = (entry.as_mut(), work) {
                        self.announce(&def, entry, published, synced);
                    }
                    self.first_seen.retain(|id, _| id.key != key);
                    self.orphans.remove(&key);
                    self.retry.remove(&key);
                    self.recheck.remove(&key);
                    if !back_online {
                        back_online = self.retry.values().any(|r| r.unreachable);
                    }
                    self.update_status(|s| {
                        s.connected = Some(true);
                        s.conflicts.remove(&name);
                        s.errors.remove(&name);
                    });
                    let applied = Outcome::Applied {
                        service,
                        endpoints,
                        error: None,
                    };
                    outcomes.insert(key.clone(), applied);
                }
                Err(refusal @ (SyncError::SelectorConflict(_) | SyncError::OtherInstance(..))) => {
                    let reason = refusal.to_string();
                    let mut known = false;
                    self.update_status(|s| {
                        s.connected = Some(true);
                        known = s.conflicts.insert(name, reason.clone()).as_ref() == Some(&reason);
                    });
                    if !known {
                        warn!(cluster = %self.name, definition = %key, "{reason}");
                    }
                    outcomes.insert(key.clone(), Outcome::Refused(reason));
                    let recheck = self.recheck.entry(key.clone()).or_default();
                    recheck.at = Instant::now() + recheck.backoff.next();
                    later(recheck.at);
                    dirty.insert(key.clone());
                }
                Err(e) => {
                    let unreachable = e.is_unreachable();
                    let retry = self.retry.entry(key.clone()).or_default();
                    retry.at = Instant::now() + retry.backoff.next();
                    retry.unreachable = unreachable;
                    later(retry.at);
                    let error = e.describe();
                    warn!(cluster = %self.name, definition = %key, %error, "apply failed; will retry");
                    self.update_status(|s| {
                        s.connected = Some(!unreachable);
                        s.last_error = Some(format!("{key}: {error}"));
                        s.errors.insert(name, error.clone());
                        s.apply_errors += 1;
                    });
                    outcomes.insert(
                        key.clone(),
                        Outcome::Applied {
                            service,
                            endpoints,
                            error: Some(error),
                        },
                    );
                    dirty.insert(key.clone());
                }
            }
            if let Some(entry) = entry {
                self.applied.insert(key, entry);
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
        self.write_statuses(snapshot, outcomes).await;
        wake
    }

    pub(super) fn local_source(&self) -> Source {
        Source::Object {
            cluster: self.name.clone(),
        }
    }

    /// Host readiness as rendered for a definition, per (port, host).
    fn published(&self, def: &Definition) -> BTreeMap<(String, IpAddr), bool> {
        def.ports
            .iter()
            .flat_map(|port| {
                port.hosts
                    .iter()
                    .map(move |host| ((port.name.clone(), *host), self.ready(def, port, *host)))
            })
            .collect()
    }

    /// A definition not yet applied here waits until each of its hosts has a first probe result
    /// (at most one period plus timeout), so it does not appear with every host not ready.
    /// Ports still in their initial delay do not hold it back: their hosts start not ready.
    /// The same holds for a definition taking over a Service from another one: the objects of
    /// the one before stay as they are meanwhile.
    fn hold_back(&mut self, def: &Definition) -> Option<Instant> {
        let id = def.id();
        if self
            .applied
            .get(&def.key)
            .is_some_and(|a| a.by.as_ref() == Some(&id))
        {
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
            .entry(id.clone())
            .or_insert_with(Instant::now)
            + grace;
        let probed = probed_now().all(|p| {
            p.hosts.iter().all(|h| {
                self.board.probed(&TargetKey {
                    definition: id.clone(),
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

/// Whether what a sink applied for a Service came from a file (unknown counts as not).
fn entry_from_files(entry: &Option<Applied>) -> bool {
    let by = entry.as_ref().and_then(|e| e.by.as_ref());
    by.is_some_and(|id| id.source == Source::File)
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
    /// What a person reads: an API refusal is its message and code (kube's own text appends a
    /// debug dump of the whole response), anything else the chain of causes.
    fn describe(&self) -> String {
        match self {
            SyncError::Kube(kube::Error::Api(status)) => {
                format!("{} ({} {})", status.message, status.code, status.reason)
            }
            other => error_chain(other),
        }
    }

    /// No answer from the API server (as opposed to an answer refusing the request).
    fn is_unreachable(&self) -> bool {
        matches!(self, SyncError::Kube(e) if !matches!(e, kube::Error::Api(_)))
    }
}

/// Definitions written at once per cluster: enough to keep a burst of transitions moving,
/// few enough not to crowd the API server.
pub(super) const WRITES_IN_FLIGHT: usize = 16;

/// One definition's work in a pass: the definition, its objects and the host readiness they
/// publish, with its cache entry.
enum Job {
    Sync(Box<SyncWork>),
    Remove,
}

struct SyncWork {
    def: Definition,
    objects: Objects,
    published: BTreeMap<(String, IpAddr), bool>,
    entry: Option<Applied>,
}

/// What a pass did for one Service, for the status of a `ClusterEndpoint` behind it.
pub(super) enum Outcome {
    /// Synced (or tried to): which parts are in line with the rendering, the error if not.
    Applied {
        service: bool,
        endpoints: bool,
        error: Option<String>,
    },
    /// Held back until its hosts are probed.
    Waiting,
    Refused(String),
    /// Nothing to write (no usable definition).
    Nothing,
}

impl Applied {
    /// Whether this cache holds exactly these objects: (Service, slices and Endpoints).
    fn holds(&self, objects: &Objects) -> (bool, bool) {
        let same = |kind: &'static str,
                    meta: &ObjectMeta,
                    value: serde_json::Result<serde_json::Value>| {
            let name = meta.name.clone().unwrap_or_default();
            match (self.objects.get(&(kind, name)), value) {
                (Some((cached, _)), Ok(value)) => *cached == value,
                _ => false,
            }
        };
        let service = same(
            "Service",
            &objects.service.metadata,
            serde_json::to_value(&objects.service),
        );
        let slices = objects.slices.iter().all(|slice| {
            same(
                "EndpointSlice",
                &slice.metadata,
                serde_json::to_value(slice),
            )
        });
        let endpoints = same(
            "Endpoints",
            &objects.endpoints.metadata,
            serde_json::to_value(&objects.endpoints),
        );
        (service, slices && endpoints)
    }
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
