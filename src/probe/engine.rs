//! The scheduler: one task per (definition, port, host), each on its own period from a random
//! offset, sharing a global concurrency limit. Probing never happens in the apply path; sinks
//! learn about readiness changes from a broadcast of definition keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rand::Rng;
use serde::Serialize;
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use super::state::{HostState, Readiness, Thresholds};
use super::stats::{ProbeStats, ResultCounts};
use super::{Outcome, probe};
use crate::model::{Check, Definition, DefinitionId, DefinitionKey, Timing};

/// One probed host on one port of one definition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TargetKey {
    pub definition: DefinitionId,
    pub port: String,
    pub host: IpAddr,
}

/// A host on a port of a Service, whichever definition it comes from: what a cluster shows.
pub type ServiceHost = (DefinitionKey, String, IpAddr);

impl TargetKey {
    pub fn service_host(&self) -> ServiceHost {
        (self.definition.key.clone(), self.port.clone(), self.host)
    }
}

/// What is probed and how; a change to any of it restarts the target with fresh state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetSpec {
    check: Arc<Check>,
    timing: Timing,
    addr: SocketAddr,
}

/// Everything known about one target, for the renderer and the status page.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetHealth {
    #[serde(flatten)]
    pub state: HostState,
    /// When the readiness last changed (or the target started).
    #[serde(serialize_with = "crate::timefmt::rfc3339")]
    pub since: SystemTime,
    #[serde(serialize_with = "crate::timefmt::rfc3339_opt")]
    pub last_probe: Option<SystemTime>,
    pub last_latency_ms: Option<f64>,
    /// Bounded reason label of the last failure, if the last probe failed.
    pub last_result: Option<&'static str>,
    pub last_error: Option<String>,
    /// Probes by result since the target started.
    pub results: ResultCounts,
    /// Readiness decisions that changed it (the first decision included).
    pub transitions: u64,
}

impl TargetHealth {
    /// Readiness and the consecutive counts capped at their thresholds, a decided host counting
    /// as having met its threshold (one seeded from the cluster has not been counted): what
    /// changes while a host moves towards a decision, and stays put while it is steady.
    pub fn settled(&self, t: Thresholds) -> (Readiness, u32, u32) {
        let successes = self.state.consecutive_successes.min(t.success);
        let failures = self.state.consecutive_failures.min(t.failure);
        match self.state.readiness {
            Readiness::Ready if failures == 0 => (Readiness::Ready, t.success, 0),
            Readiness::NotReady if successes == 0 => (Readiness::NotReady, 0, t.failure),
            readiness => (readiness, successes, failures),
        }
    }
}

/// Health of every target, shared by the engine (writer), sinks and status server (readers).
#[derive(Debug, Default)]
pub struct HealthBoard {
    targets: Mutex<HashMap<TargetKey, TargetHealth>>,
    /// Hosts a cluster showed ready at start, for targets that have not started yet (objects
    /// are listed after the sinks start); dropped by [`HealthBoard::settle_seeds`].
    seeds: Mutex<HashSet<ServiceHost>>,
    pub stats: ProbeStats,
}

impl HealthBoard {
    pub fn readiness(&self, key: &TargetKey) -> Readiness {
        self.lock()
            .get(key)
            .map_or(Readiness::Unknown, |h| h.state.readiness)
    }

    pub fn snapshot(&self) -> BTreeMap<TargetKey, TargetHealth> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TargetKey, TargetHealth>> {
        // A panic elsewhere must not take the status page down with it.
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a target, undecided unless `seeded` or a seed for its host is pending.
    fn start(&self, key: &TargetKey, seeded: bool) {
        let seeded = seeded || self.pending_seeds().contains(&key.service_host());
        let readiness = if seeded {
            Readiness::Ready
        } else {
            Readiness::Unknown
        };
        let health = TargetHealth {
            state: HostState {
                readiness,
                ..HostState::default()
            },
            since: SystemTime::now(),
            last_probe: None,
            last_latency_ms: None,
            last_result: None,
            last_error: None,
            results: ResultCounts::default(),
            transitions: 0,
        };
        self.lock().insert(key.clone(), health);
    }

    /// Takes targets of this host that are still undecided as ready (what the cluster already
    /// shows), so it takes `failureThreshold` failures to take them out. Their first probes may
    /// already have run without reaching a threshold; a decision the probes did reach is kept.
    /// Targets that start later take the seed too, until [`HealthBoard::settle_seeds`].
    pub fn seed_ready(&self, host: ServiceHost) {
        for (key, health) in self.lock().iter_mut() {
            if health.state.readiness == Readiness::Unknown && key.service_host() == host {
                health.state.readiness = Readiness::Ready;
            }
        }
        self.pending_seeds().insert(host);
    }

    /// Every source has been read once: seeds no target took are stale.
    pub fn settle_seeds(&self) {
        self.pending_seeds().clear();
    }

    fn pending_seeds(&self) -> std::sync::MutexGuard<'_, HashSet<ServiceHost>> {
        self.seeds.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn health(&self, key: &TargetKey) -> Option<TargetHealth> {
        self.lock().get(key).cloned()
    }

    /// Whether the target has at least one probe result.
    pub fn probed(&self, key: &TargetKey) -> bool {
        self.lock().get(key).is_some_and(|h| h.last_probe.is_some())
    }

    /// Records an outcome; returns (new readiness if it changed, whether readers should hear of
    /// it). Readers hear of the first result, of a readiness change, and of every step towards
    /// a threshold (counts saturate there), not of a steady host's repeated results.
    fn record(
        &self,
        key: &TargetKey,
        outcome: &Outcome,
        thresholds: Thresholds,
    ) -> (Option<Readiness>, bool) {
        let mut targets = self.lock();
        let Some(health) = targets.get_mut(key) else {
            return (None, false);
        };
        let before = (health.settled(thresholds), health.last_result);
        let first = health.last_probe.is_none();
        let now = SystemTime::now();
        let changed = health.state.record(outcome.result.is_ok(), thresholds);
        if changed.is_some() {
            health.since = now;
            health.transitions += 1;
        }
        health.last_probe = Some(now);
        health.last_latency_ms = Some(outcome.latency.as_secs_f64() * 1000.0);
        let result = outcome
            .result
            .as_ref()
            .map_or_else(|f| f.label(), |()| "success");
        health.last_result = Some(result);
        health.results.record(result);
        self.stats.finished(outcome.latency);
        health.last_error = outcome.result.as_ref().err().map(ToString::to_string);
        let after = (health.settled(thresholds), health.last_result);
        (changed, first || before != after)
    }

    fn remove(&self, key: &TargetKey) {
        self.lock().remove(key);
    }
}

pub struct Engine {
    board: Arc<HealthBoard>,
    limit: Arc<Semaphore>,
    changes: broadcast::Sender<DefinitionKey>,
    running: HashMap<TargetKey, (TargetSpec, JoinHandle<()>)>,
}

impl Engine {
    /// `concurrency` bounds probes in flight across all targets.
    pub fn new(concurrency: usize, changes: broadcast::Sender<DefinitionKey>) -> Self {
        Engine {
            board: Arc::new(HealthBoard::default()),
            limit: Arc::new(Semaphore::new(concurrency.max(1))),
            changes,
            running: HashMap::new(),
        }
    }

    pub fn board(&self) -> Arc<HealthBoard> {
        self.board.clone()
    }

    /// Brings the running targets in line with the definitions: unchanged targets keep their
    /// state and schedule, changed ones restart, removed ones stop and forget their health.
    /// A target that replaces another for the same host of the same Service (its check
    /// changed, or another definition took the Service over) starts as ready if that one was,
    /// so the change never flaps a healthy host.
    pub fn reconcile<'a>(&mut self, definitions: impl IntoIterator<Item = &'a Definition>) {
        let wanted = targets_of(definitions);
        // Ready hosts by Service, port name and host, and by Service and address (the same
        // address under another port name: a renamed port).
        let (ready_before, ready_addresses): (
            HashSet<ServiceHost>,
            HashSet<(DefinitionKey, SocketAddr)>,
        ) = {
            let board = self.board.lock();
            (self.running.iter())
                .filter(|(key, _)| {
                    board
                        .get(key)
                        .is_some_and(|h| h.state.readiness == Readiness::Ready)
                })
                .map(|(key, (spec, _))| {
                    let address = (key.definition.key.clone(), spec.addr);
                    (key.service_host(), address)
                })
                .unzip()
        };
        self.running.retain(|key, (spec, task)| {
            let keep = wanted.get(key) == Some(spec);
            if !keep {
                task.abort();
                self.board.remove(key);
            }
            keep
        });
        for (key, spec) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let was_ready = ready_before.contains(&key.service_host())
                || ready_addresses.contains(&(key.definition.key.clone(), spec.addr));
            self.board.start(&key, was_ready);
            let task = tokio::spawn(run_target(
                key.clone(),
                spec.clone(),
                self.board.clone(),
                self.limit.clone(),
                self.changes.clone(),
            ));
            self.running.insert(key, (spec, task));
        }
    }

    pub fn shutdown(&mut self) {
        for (_, (_, task)) in self.running.drain() {
            task.abort();
        }
    }
}

fn targets_of<'a>(
    definitions: impl IntoIterator<Item = &'a Definition>,
) -> HashMap<TargetKey, TargetSpec> {
    let mut targets = HashMap::new();
    for def in definitions {
        for port in &def.ports {
            let Some(check) = &port.check else { continue };
            for host in &port.hosts {
                let key = TargetKey {
                    definition: def.id(),
                    port: port.name.clone(),
                    host: *host,
                };
                let spec = TargetSpec {
                    check: check.clone(),
                    timing: port.timing,
                    addr: SocketAddr::new(*host, port.target_port),
                };
                targets.insert(key, spec);
            }
        }
    }
    targets
}

async fn run_target(
    key: TargetKey,
    spec: TargetSpec,
    board: Arc<HealthBoard>,
    limit: Arc<Semaphore>,
    changes: broadcast::Sender<DefinitionKey>,
) {
    let period = spec.timing.period;
    // A random offset spreads thousands of targets over the period instead of bursting at once.
    let offset = period.mul_f64(rand::rng().random::<f64>());
    let first = Instant::now() + spec.timing.initial_delay + offset;
    let mut ticks = tokio::time::interval_at(first, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let thresholds = Thresholds {
        success: spec.timing.success_threshold,
        failure: spec.timing.failure_threshold,
    };
    loop {
        let scheduled = ticks.tick().await;
        let Ok(_permit) = limit.acquire().await else {
            return;
        };
        board.stats.started(scheduled.elapsed());
        // Boxed: the probe future (TLS, HTTP and gRPC clients inside) is kilobytes, and inline it
        // would make each of thousands of idle target tasks that large between probes.
        let outcome = Box::pin(probe(&spec.check, spec.addr, spec.timing.timeout)).await;
        let (changed, notify) = board.record(&key, &outcome, thresholds);
        if let Some(readiness) = changed {
            match &outcome.result {
                Ok(()) => {
                    info!(target = %key.definition, port = %key.port, host = %key.host, ?readiness, "host readiness changed")
                }
                Err(e) => {
                    warn!(target = %key.definition, port = %key.port, host = %key.host, ?readiness, error = %e, "host readiness changed")
                }
            }
        }
        // The first result matters too: sinks hold a new definition back until its hosts are
        // probed, and object status shows the counts.
        if notify {
            // No receiver just means no sink is running yet; the sinks read the board on start.
            let _ = changes.send(key.definition.key.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::model::{Port, Protocol, Source};

    fn definition(port: u16, period: Duration, check: Check) -> Definition {
        Definition {
            key: DefinitionKey {
                namespace: "default".into(),
                name: "d".into(),
            },
            source: Source::File,
            object: None,
            origin: "test".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            cluster_ip: None,
            clusters: None,
            ports: vec![Port {
                name: "p".into(),
                protocol: Protocol::Tcp,
                port,
                target_port: port,
                // Loopback is fine for the engine; only the API server refuses it in endpoints.
                hosts: vec![Ipv4Addr::LOCALHOST.into()],
                check: Some(Arc::new(check)),
                timing: Timing {
                    period,
                    timeout: Duration::from_secs(2),
                    initial_delay: Duration::ZERO,
                    success_threshold: 1,
                    failure_threshold: 1,
                },
            }],
        }
    }

    fn task_ids(engine: &Engine) -> Vec<tokio::task::Id> {
        engine.running.values().map(|(_, task)| task.id()).collect()
    }

    #[tokio::test]
    async fn seeding_trusts_the_cluster_until_the_probes_decide() {
        let (changes, _) = broadcast::channel(16);
        let mut engine = Engine::new(1, changes);
        let def = definition(1, Duration::from_secs(3600), Check::Tcp);
        engine.reconcile([&def]);
        let key = engine.running.keys().next().unwrap().clone();
        let outcome = |ok: bool| Outcome {
            result: if ok {
                Ok(())
            } else {
                Err(super::super::Failure::Refused)
            },
            latency: Duration::ZERO,
        };
        let thresholds = Thresholds {
            success: 3,
            failure: 2,
        };
        // One success below the threshold: still undecided, so the cluster's word counts.
        engine.board.record(&key, &outcome(true), thresholds);
        engine.board.seed_ready(key.service_host());
        assert_eq!(engine.board.readiness(&key), Readiness::Ready);
        // A decision the probes reached is not overridden.
        engine.board.record(&key, &outcome(false), thresholds);
        engine.board.record(&key, &outcome(false), thresholds);
        engine.board.seed_ready(key.service_host());
        assert_eq!(engine.board.readiness(&key), Readiness::NotReady);
        engine.shutdown();
    }

    #[tokio::test]
    async fn each_target_counts_its_results_and_transitions() {
        let (changes, _) = broadcast::channel(16);
        let mut engine = Engine::new(1, changes);
        engine.reconcile([&definition(1, Duration::from_secs(3600), Check::Tcp)]);
        let key = engine.running.keys().next().unwrap().clone();
        let thresholds = Thresholds {
            success: 1,
            failure: 2,
        };
        for result in [
            Ok(()),
            Err(super::super::Failure::Refused),
            Err(super::super::Failure::Refused),
        ] {
            let outcome = Outcome {
                result,
                latency: Duration::from_millis(3),
            };
            engine.board.record(&key, &outcome, thresholds);
        }
        let health = engine.board.snapshot()[&key].clone();
        assert_eq!(
            health.results.iter().collect::<Vec<_>>(),
            [("success", 1), ("refused", 2)]
        );
        assert_eq!(health.transitions, 2, "unknown → ready → not ready");
        assert_eq!(
            *engine.board.stats.snapshot().duration_ms.last().unwrap(),
            (None, 3)
        );
        engine.shutdown();
    }

    #[test]
    fn an_idle_target_task_stays_small() {
        let (changes, _) = broadcast::channel(1);
        let spec = TargetSpec {
            check: Arc::new(Check::Tcp),
            timing: definition(1, Duration::from_secs(1), Check::Tcp).ports[0].timing,
            addr: (Ipv4Addr::LOCALHOST, 1).into(),
        };
        let key = TargetKey {
            definition: DefinitionId {
                key: DefinitionKey {
                    namespace: "n".into(),
                    name: "d".into(),
                },
                source: Source::File,
            },
            port: "p".into(),
            host: Ipv4Addr::LOCALHOST.into(),
        };
        let task = run_target(
            key,
            spec,
            Arc::default(),
            Arc::new(Semaphore::new(1)),
            changes,
        );
        // Thousands of these live at once; the probe itself is allocated only while it runs.
        assert!(
            std::mem::size_of_val(&task) < 1024,
            "{} bytes",
            std::mem::size_of_val(&task)
        );
    }

    #[tokio::test]
    async fn a_reconcile_keeps_unchanged_targets_and_restarts_changed_ones() {
        let (changes, _) = broadcast::channel(16);
        let mut engine = Engine::new(10, changes);
        let def = definition(1, Duration::from_secs(60), Check::Tcp);
        engine.reconcile([&def]);
        let first = task_ids(&engine);
        engine.reconcile([&def]);
        assert_eq!(
            task_ids(&engine),
            first,
            "unchanged target keeps its task and schedule"
        );
        let slower = definition(1, Duration::from_secs(120), Check::Tcp);
        engine.reconcile([&slower]);
        assert_ne!(
            task_ids(&engine),
            first,
            "a changed period restarts the target"
        );
        engine.reconcile([]);
        assert!(
            engine.running.is_empty() && engine.board.snapshot().is_empty(),
            "removed targets stop and are forgotten"
        );
    }

    #[tokio::test]
    async fn a_renamed_port_keeps_its_ready_hosts_ready() {
        let (changes, _) = broadcast::channel(16);
        let mut engine = Engine::new(1, changes);
        let def = definition(1, Duration::from_secs(3600), Check::Tcp);
        engine.reconcile([&def]);
        let key = engine.running.keys().next().unwrap().clone();
        engine.board.seed_ready(key.service_host());
        let mut renamed = def.clone();
        renamed.ports[0].name = "renamed".into();
        engine.reconcile([&renamed]);
        let (key, _) = engine.running.iter().next().unwrap();
        assert_eq!(key.port, "renamed");
        assert_eq!(engine.board.readiness(key), Readiness::Ready);
        // Renamed and moved to another address: another target, undecided.
        let mut moved = renamed.clone();
        moved.ports[0].name = "moved".into();
        moved.ports[0].target_port = 2;
        engine.reconcile([&moved]);
        let (key, _) = engine.running.iter().next().unwrap();
        assert_eq!(engine.board.readiness(key), Readiness::Unknown);
        engine.shutdown();
    }

    #[tokio::test]
    async fn a_hanging_target_does_not_delay_another() {
        // One server accepts and never answers HTTP; the other accepts TCP at once.
        let hanging = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let fast = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let (hang_port, fast_port) = (
            hanging.local_addr().unwrap().port(),
            fast.local_addr().unwrap().port(),
        );
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = hanging.accept().await {
                held.push(conn);
            }
        });
        tokio::spawn(async move { while fast.accept().await.is_ok() {} });
        let http = Check::Http(crate::model::HttpCheck {
            https: false,
            path: "/".into(),
            headers: vec![],
            verify: None,
        });
        let mut slow = definition(hang_port, Duration::from_millis(100), http);
        slow.key.name = "slow".into();
        let quick = definition(fast_port, Duration::from_millis(100), Check::Tcp);
        let (changes, _) = broadcast::channel(16);
        let mut engine = Engine::new(4, changes);
        engine.reconcile([&slow, &quick]);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let snapshot = engine.board.snapshot();
        let quick_health = snapshot
            .values()
            .find(|h| h.last_result == Some("success"))
            .expect("the fast target was probed");
        assert_eq!(quick_health.state.readiness, Readiness::Ready);
        // ~10 periods passed; the fast target kept its schedule while the other hung.
        assert!(
            engine.board.stats.snapshot().probes_total >= 8,
            "{:?}",
            engine.board.stats.snapshot()
        );
        let slow_health = snapshot
            .iter()
            .find(|(k, _)| k.definition.key.name == "slow")
            .map(|(_, h)| h)
            .unwrap();
        assert_eq!(
            slow_health.last_probe, None,
            "the hanging probe is still waiting for its timeout"
        );
        engine.shutdown();
    }
}
