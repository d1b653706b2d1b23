//! `run`: wires sources → model → probe engine → cluster sinks and the status server, then
//! follows changes until SIGTERM / Ctrl-C: definition files and the config file are watched (and
//! SIGHUP reloads both). A broken config keeps the running one. Stopping leaves every applied
//! object as it is.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{self, ClusterConfig, Config, LeaderElectionConfig, Overrides, SourcesConfig};
use crate::model::{DefinitionKey, Desired, Problem, unknown_clusters};
use crate::probe::{self, Engine, HealthBoard};
use crate::sink::{ClusterStatus, Writer, connect, try_ready_hosts};
use crate::sources::files::{self, Loaded};
use crate::sources::objects::{self, ObjectList};
use crate::sources::watch::FileWatch;
use crate::status::{self, DaemonState, SharedClusters, StatusState};

pub async fn run(config_path: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let mut config = config::load(config_path.as_deref(), &overrides)?;
    let config_file = config_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
    // Watch before the first read, so an edit during start-up is not missed.
    let mut file_watch = watch_all(&config, &config_file)?;
    let mut loaded = files::load(&config.sources.paths);
    let mut config_problem: Option<Problem> = None;
    let (object_updates, mut object_lists) = mpsc::channel(64);
    let mut objects: BTreeMap<String, ObjectList> = BTreeMap::new();
    let desired = Arc::new(desired_of(
        &loaded,
        &objects,
        &config,
        None,
        &Desired::default(),
    ));
    info!(
        definitions = desired.definitions.len(),
        problems = desired.problems.len(),
        "definitions loaded"
    );

    // Capacity covers a burst of transitions; a sink that lags just resyncs everything.
    let (changes, _) = broadcast::channel(4096);
    let slots = probe::probe_slots(config.probes.concurrency);
    match slots.lowered_from {
        Some(configured) => warn!(
            configured,
            slots = slots.slots,
            open_files = slots.open_files,
            "probes.concurrency is more than the open-files limit allows; raise LimitNOFILE"
        ),
        None => info!(
            slots = slots.slots,
            open_files = slots.open_files,
            "probe concurrency"
        ),
    }
    let mut engine = Engine::new(slots.slots, changes.clone());
    let (desired_tx, desired_rx) = watch::channel(desired.clone());
    engine.reconcile(desired.definitions.values());

    let mut sinks = Sinks {
        running: BTreeMap::new(),
        writers: Vec::new(),
        shown: SharedClusters::default(),
        object_updates,
    };
    // Listening before the clusters are set up (which can take seconds each): /healthz answers
    // and /readyz says what the daemon is waiting for.
    let listener = status::bind(config.status.listen)
        .await
        .with_context(|| format!("status server cannot listen on {}", config.status.listen))?;
    info!(listen = %config.status.listen, "status server listening");
    let daemon = Arc::new(DaemonState::default());
    let state = StatusState {
        desired: desired_rx.clone(),
        board: engine.board(),
        clusters: sinks.shown.clone(),
        daemon: daemon.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, status::router(state)).await {
            error!(error = %e, "status server stopped");
        }
    });
    sinks
        .follow(&config, engine.board(), &desired_rx, &changes)
        .await;
    daemon.clusters_started();
    if !config.sources.crd {
        engine.board().settle_seeds();
    }

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = file_watch.changed() => {}
            Some(list) = object_lists.recv() => {
                // Take every list that is waiting: one recomputation for a burst of changes.
                objects.insert(list.cluster.clone(), list);
                while let Ok(list) = object_lists.try_recv() {
                    objects.insert(list.cluster.clone(), list);
                }
                objects.retain(|cluster, _| sinks.running.contains_key(cluster));
                // A separate statement: the borrow must end before `publish` writes.
                let next = desired_of(&loaded, &objects, &config, config_problem.as_ref(), &desired_tx.borrow());
                publish(&next, &mut engine, &desired_tx);
                continue;
            }
        }
        let reloaded = reload_config(config_path.as_deref(), &config_file, &overrides);
        daemon.reloaded(reloaded.is_ok());
        match reloaded {
            Ok(next) if next != config => {
                if next.probes != config.probes || next.status != config.status {
                    warn!("probes.* and status.* take effect at the next restart");
                }
                if next.sources != config.sources {
                    file_watch = watch_all(&next, &config_file)?;
                }
                config = next;
                config_problem = None;
                sinks
                    .follow(&config, engine.board(), &desired_rx, &changes)
                    .await;
                info!("configuration reloaded");
            }
            Ok(_) => config_problem = None,
            Err(e) => {
                let problem = Problem {
                    origin: config_file.display().to_string(),
                    field: String::new(),
                    value: String::new(),
                    reason: format!("{e}; the running configuration stays in force"),
                };
                config_problem = Some(problem);
            }
        }
        loaded = files::reload(&config.sources.paths, &loaded);
        objects.retain(|cluster, _| sinks.running.contains_key(cluster));
        let next = desired_of(
            &loaded,
            &objects,
            &config,
            config_problem.as_ref(),
            &desired_tx.borrow(),
        );
        publish(&next, &mut engine, &desired_tx);
    }
    info!("shutting down; applied objects are left as they are");
    engine.shutdown();
    sinks.stop().await;
    Ok(())
}

/// Reloads the config; an empty file is taken for one being written, not for "all defaults"
/// (which would drop every configured cluster).
fn reload_config(
    path: Option<&std::path::Path>,
    file: &std::path::Path,
    overrides: &Overrides,
) -> Result<Config, config::ConfigError> {
    if std::fs::read_to_string(file).is_ok_and(|text| text.trim().is_empty()) {
        return Err(config::ConfigError::Empty(file.to_path_buf()));
    }
    config::load(path, overrides)
}

fn watch_all(config: &Config, config_file: &std::path::Path) -> anyhow::Result<FileWatch> {
    let mut paths = config.sources.paths.clone();
    paths.push(config_file.to_path_buf());
    FileWatch::new(&paths).context("watching definition and config files")
}

/// Hands a new desired state to the probe engine and the sinks, if it changed. Once every
/// cluster's objects are listed, seeds no target took are stale and go.
fn publish(next: &Desired, engine: &mut Engine, desired: &watch::Sender<Arc<Desired>>) {
    if *next == **desired.borrow() {
        return;
    }
    info!(
        definitions = next.definitions.len(),
        problems = next.problems.len(),
        "definitions reloaded"
    );
    engine.reconcile(next.definitions.values());
    if next.objects_complete {
        engine.board().settle_seeds();
    }
    desired.send_replace(Arc::new(next.clone()));
}

/// The running cluster sinks (with their object sources), kept in line with the configured
/// clusters.
struct Sinks {
    running: BTreeMap<String, Running>,
    /// Every writer task started, to wait for on shutdown (Leases being released).
    writers: Vec<JoinHandle<()>>,
    shown: SharedClusters,
    object_updates: mpsc::Sender<ObjectList>,
}

/// One cluster's tasks, and what they were started with.
struct Running {
    cluster: ClusterConfig,
    instance: String,
    sources: SourcesConfig,
    election: LeaderElectionConfig,
    tasks: Vec<JoinHandle<()>>,
    /// Tells the writer to stop (releasing its Lease first, with leader election).
    stop: watch::Sender<bool>,
}

impl Running {
    fn stop(&self) {
        self.stop.send_replace(true);
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Sinks {
    /// Starts sinks for new clusters, restarts changed ones, stops removed ones. A removed
    /// cluster keeps its objects: taking a cluster out of the config is not a request to empty it.
    async fn follow(
        &mut self,
        config: &Config,
        board: Arc<HealthBoard>,
        desired: &watch::Receiver<Arc<Desired>>,
        changes: &broadcast::Sender<DefinitionKey>,
    ) {
        let wanted: BTreeMap<String, ClusterConfig> = config
            .target_clusters()
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let objects = |s: &SourcesConfig| (s.crd, s.namespaces.clone());
        self.running.retain(|name, running| {
            let keep = wanted.get(name) == Some(&running.cluster)
                && running.instance == config.instance
                && running.election == config.leader_election
                && objects(&running.sources) == objects(&config.sources);
            if !keep {
                running.stop();
                info!(cluster = %name, "cluster sink stopped");
            }
            keep
        });
        let mut shown = Vec::new();
        for (name, cluster) in wanted {
            if self.running.contains_key(&name) {
                let existing = self
                    .shown
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .find(|s| status_name(s) == name)
                    .cloned();
                shown.extend(existing);
                continue;
            }
            // A cluster whose kubeconfig cannot be used is reported; the others still run.
            let client = match connect(&cluster).await {
                Ok(client) => client,
                Err(e) => {
                    error!(cluster = %name, error = %format!("{e:#}"), "cluster unusable; skipped");
                    let status = ClusterStatus {
                        name: name.clone(),
                        connected: Some(false),
                        last_error: Some(format!("{e:#}")),
                        ..Default::default()
                    };
                    shown.push(Arc::new(Mutex::new(status)));
                    continue;
                }
            };
            let status = Arc::new(Mutex::new(ClusterStatus {
                name: name.clone(),
                ..Default::default()
            }));
            seed(&name, client.clone(), &board, &status).await;
            let mut tasks = Vec::new();
            if config.sources.crd {
                let updates = self.object_updates.clone();
                let namespaces = &config.sources.namespaces;
                let source = objects::spawn(name.clone(), client.clone(), namespaces, updates);
                tasks.push(source);
            }
            let (stop, stopped) = watch::channel(false);
            let writer = Writer {
                name: name.clone(),
                instance: config.instance.clone(),
                client,
                board: board.clone(),
                status: status.clone(),
                desired: desired.clone(),
                changes: changes.clone(),
            };
            let election = config.leader_election.clone();
            let writing = if election.enabled {
                tokio::spawn(writer.lead(election, stopped))
            } else {
                tokio::spawn(writer.write(stopped))
            };
            shown.push(status);
            let running = Running {
                cluster,
                instance: config.instance.clone(),
                sources: config.sources.clone(),
                election: config.leader_election.clone(),
                tasks,
                stop,
            };
            self.writers.retain(|w| !w.is_finished());
            self.writers.push(writing);
            self.running.insert(name, running);
        }
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = shown;
    }
}

impl Sinks {
    /// Stops writing everywhere; with leader election each Lease is released first, so a
    /// standby takes over at once.
    async fn stop(self) {
        for running in self.running.values() {
            running.stop();
        }
        for writer in self.writers {
            let _ = tokio::time::timeout(Duration::from_secs(6), writer).await;
        }
    }
}

/// Trusts what the cluster already shows as ready until probes say otherwise. Its answer (or
/// the lack of one) is the cluster's first word on the status page and `/readyz`, also when no
/// definition is ever applied there.
async fn seed(
    name: &str,
    client: kube::Client,
    board: &HealthBoard,
    status: &Mutex<ClusterStatus>,
) {
    let seeded = try_ready_hosts(client, Duration::from_secs(5)).await;
    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
    match seeded {
        Ok(ready) => {
            for host in ready {
                board.seed_ready(host);
            }
            status.connected = Some(true);
        }
        Err(e) => {
            status.connected = Some(e.answered());
            // With its causes: "client error (Connect)" alone does not say why.
            let error = format!("{:#}", anyhow::Error::new(e));
            warn!(cluster = %name, %error, "listing what the cluster shows as ready failed");
            status.last_error = Some(format!("listing EndpointSlices: {error}"));
        }
    }
}

fn status_name(status: &Arc<Mutex<ClusterStatus>>) -> String {
    status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .name
        .clone()
}

/// The desired state the files and objects describe, with problems logged once when they
/// first appear. Objects are complete once every configured cluster has listed its own.
fn desired_of(
    loaded: &Loaded,
    objects: &BTreeMap<String, ObjectList>,
    config: &Config,
    config_problem: Option<&Problem>,
    previous: &Desired,
) -> Desired {
    let names: Vec<String> = config
        .target_clusters()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let mut desired = Desired {
        objects_complete: !config.sources.crd || names.iter().all(|n| objects.contains_key(n)),
        ..Desired::default()
    };
    let from_objects = objects.values().flat_map(|list| list.definitions.iter());
    for def in loaded.definitions.values().chain(from_objects) {
        desired.definitions.insert(def.id(), def.clone());
    }
    for list in objects.values() {
        desired.objects.extend(list.objects.clone());
    }
    desired.unusable = loaded.unusable.clone();
    // An object without a usable definition (and no last good one) keeps what it has.
    let unusable_objects = (desired.objects.keys())
        .filter(|id| !desired.definitions.contains_key(id))
        .map(|id| id.key.clone());
    desired.unusable.keys.extend(unusable_objects);
    let problems = &mut desired.problems;
    problems.extend(config_problem.cloned());
    problems.extend(loaded.problems.iter().cloned());
    problems.extend(
        desired
            .objects
            .values()
            .flat_map(|o| o.problems.iter().cloned()),
    );
    let unknown = unknown_clusters(desired.definitions.values(), &names);
    // An object naming a cluster that is not configured says so in its own status too.
    for problem in &unknown {
        let object = desired
            .definitions
            .values()
            .find(|d| d.origin == problem.origin);
        if let Some(state) = object.and_then(|d| desired.objects.get_mut(&d.id())) {
            state.problems.push(problem.clone());
        }
    }
    desired.problems.extend(unknown);
    let overlaps = desired.overlaps(&names);
    desired.problems.extend(overlaps);
    for problem in desired
        .problems
        .iter()
        .filter(|p| !previous.problems.contains(p))
    {
        warn!(%problem, "definition problem");
    }
    desired
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
