//! `run`: wires sources → model → probe engine → cluster sinks and the status server, then
//! reloads definitions when their files change (or on SIGHUP) until SIGTERM / Ctrl-C. Stopping
//! leaves every applied object as it is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::model::{Desired, unknown_clusters};
use crate::probe::Engine;
use crate::sink::{ClusterSink, ClusterStatus, connect, ready_hosts};
use crate::sources::files::{self, Loaded};
use crate::sources::watch::FileWatch;
use crate::status::{self, StatusState};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let clusters = config.target_clusters();
    let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
    // Watch before the first read, so an edit during start-up is not missed.
    let mut file_watch =
        FileWatch::new(&config.sources.paths).context("watching definition files")?;
    let mut loaded = files::load(&config.sources.paths);
    let desired = Arc::new(desired_of(&loaded, &names, &Desired::default()));
    info!(
        definitions = desired.definitions.len(),
        problems = desired.problems.len(),
        "definitions loaded"
    );

    // Capacity covers a burst of transitions; a sink that lags just resyncs everything.
    let (changes, _) = broadcast::channel(4096);
    let mut engine = Engine::new(config.probes.concurrency, changes.clone());
    let (desired_tx, desired_rx) = watch::channel(desired.clone());
    engine.reconcile(desired.definitions.values());

    let mut cluster_status = Vec::new();
    for cluster in clusters {
        // A cluster whose kubeconfig cannot be used is reported; the others still run.
        let client = match connect(&cluster).await {
            Ok(client) => client,
            Err(e) => {
                error!(cluster = %cluster.name, error = %format!("{e:#}"), "cluster unusable; skipped");
                let status = ClusterStatus {
                    name: cluster.name.clone(),
                    last_error: Some(format!("{e:#}")),
                    ..Default::default()
                };
                cluster_status.push(Arc::new(Mutex::new(status)));
                continue;
            }
        };
        for key in ready_hosts(client.clone(), Duration::from_secs(5)).await {
            engine.board().seed_ready(&key);
        }
        let sink = ClusterSink::new(
            cluster.name.clone(),
            config.instance.clone(),
            client,
            engine.board(),
        );
        cluster_status.push(sink.status());
        tokio::spawn(sink.run(desired_rx.clone(), changes.subscribe()));
    }

    let listener = status::bind(config.status.listen)
        .await
        .with_context(|| format!("status server cannot listen on {}", config.status.listen))?;
    info!(listen = %config.status.listen, "status server listening");
    let state = StatusState {
        desired: desired_rx,
        board: engine.board(),
        clusters: cluster_status,
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, status::router(state)).await {
            error!(error = %e, "status server stopped");
        }
    });

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = file_watch.changed() => {
                loaded = files::reload(&config.sources.paths, &loaded);
                let current = desired_tx.borrow().clone();
                let next = desired_of(&loaded, &names, &current);
                if next != *current {
                    info!(definitions = next.definitions.len(), problems = next.problems.len(), "definitions reloaded");
                    engine.reconcile(next.definitions.values());
                    desired_tx.send_replace(Arc::new(next));
                }
            }
        }
    }
    info!("shutting down; applied objects are left as they are");
    engine.shutdown();
    Ok(())
}

/// The desired state the files describe, with problems logged once when they first appear.
fn desired_of(loaded: &Loaded, clusters: &[String], previous: &Desired) -> Desired {
    let mut problems = loaded.problems.clone();
    problems.extend(unknown_clusters(loaded.definitions.values(), clusters));
    for problem in problems.iter().filter(|p| !previous.problems.contains(p)) {
        warn!(%problem, "definition problem");
    }
    Desired {
        definitions: loaded.definitions.clone(),
        problems,
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
