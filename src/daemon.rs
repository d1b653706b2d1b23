//! `run`: wires sources → model → probe engine → cluster sinks and the status server, then
//! waits for SIGTERM / Ctrl-C. Stopping leaves every applied object as it is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, watch};
use tracing::{error, info};

use crate::config::Config;
use crate::model::Desired;
use crate::probe::Engine;
use crate::sink::{ClusterSink, ClusterStatus, connect, ready_hosts};
use crate::sources::files;
use crate::status::{self, StatusState};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut loaded = files::load(&config.sources.paths);
    let names: Vec<String> = config
        .target_clusters()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    loaded.problems.extend(crate::model::unknown_clusters(
        loaded.definitions.values(),
        &names,
    ));
    for problem in &loaded.problems {
        error!(%problem, "definition problem");
    }
    info!(
        definitions = loaded.definitions.len(),
        problems = loaded.problems.len(),
        "definitions loaded"
    );
    let desired = Arc::new(Desired {
        definitions: loaded.definitions,
        problems: loaded.problems,
    });

    // Capacity covers a burst of transitions; a sink that lags just resyncs everything.
    let (changes, _) = broadcast::channel(4096);
    let mut engine = Engine::new(config.probes.concurrency, changes.clone());
    let (desired_tx, desired_rx) = watch::channel(desired.clone());
    engine.reconcile(desired.definitions.values());

    let mut cluster_status = Vec::new();
    for cluster in config.target_clusters() {
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
        let sink = ClusterSink::new(cluster.name.clone(), client, engine.board());
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

    shutdown_signal().await;
    info!("shutting down; applied objects are left as they are");
    engine.shutdown();
    drop(desired_tx);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
