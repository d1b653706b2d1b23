//! The status server, read-only: `/` (a page for people), `/api/v1/status` (the same as JSON:
//! every definition, port and host with its health, the per-cluster apply state, and the problems
//! found in the sources), `/metrics` (OpenMetrics), `/readyz` and `/healthz`.

mod listener;
mod metrics;
mod page;
mod ready;
#[cfg(test)]
mod sample;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::model::{Desired, Problem, Source};
use crate::probe::state::Readiness;
use crate::probe::{HealthBoard, StatsSnapshot, TargetHealth, TargetKey};
use crate::sink::ClusterStatus;

#[derive(Clone, Debug)]
pub struct StatusState {
    pub desired: watch::Receiver<Arc<Desired>>,
    pub board: Arc<HealthBoard>,
    pub clusters: SharedClusters,
    pub daemon: Arc<DaemonState>,
}

/// The status of each configured cluster; the list changes when the config is reloaded.
pub type SharedClusters = Arc<Mutex<Vec<Arc<Mutex<ClusterStatus>>>>>;

/// What the daemon's own loop tells the status server.
#[derive(Debug, Default)]
pub struct DaemonState {
    clusters_started: AtomicBool,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
}

impl DaemonState {
    /// Every configured cluster has been set up once: it has a sink, or it is reported unusable.
    pub fn clusters_started(&self) {
        self.clusters_started.store(true, Ordering::Relaxed);
    }

    /// A reload after a file change or SIGHUP; `ok` when the config file could be used.
    pub fn reloaded(&self, ok: bool) {
        let counter = if ok {
            &self.reloads
        } else {
            &self.failed_reloads
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn started(&self) -> bool {
        self.clusters_started.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub definitions: Vec<DefinitionReport>,
    pub clusters: Vec<ClusterStatus>,
    pub problems: Vec<Problem>,
    pub probes: StatsSnapshot,
    /// Whether every configured cluster has been set up (see `/readyz`).
    pub started: bool,
    pub config_reloads: Reloads,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Reloads {
    pub succeeded: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefinitionReport {
    pub namespace: String,
    pub name: String,
    /// A file, or an object in a named cluster.
    pub source: Source,
    pub origin: String,
    pub ports: Vec<PortReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortReport {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: &'static str,
    /// `null` for a static port.
    pub probe: Option<&'static str>,
    pub hosts: Vec<HostReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostReport {
    pub host: IpAddr,
    pub ready: bool,
    #[serde(flatten)]
    pub health: Option<TargetHealth>,
}

pub fn report(state: &StatusState) -> StatusReport {
    let desired = state.desired.borrow().clone();
    // Owned: each host's health moves into the report instead of being copied again.
    let mut health = state.board.snapshot();
    let definitions = desired
        .definitions
        .values()
        .map(|def| DefinitionReport {
            namespace: def.key.namespace.clone(),
            name: def.key.name.clone(),
            source: def.source.clone(),
            origin: def.origin.clone(),
            ports: def
                .ports
                .iter()
                .map(|port| PortReport {
                    name: port.name.clone(),
                    port: port.port,
                    target_port: port.target_port,
                    protocol: port.protocol.as_str(),
                    probe: port.check.as_ref().map(|c| c.kind()),
                    hosts: port
                        .hosts
                        .iter()
                        .map(|host| {
                            let key = TargetKey {
                                definition: def.id(),
                                port: port.name.clone(),
                                host: *host,
                            };
                            let health = health.remove(&key);
                            let ready = port.check.is_none()
                                || health
                                    .as_ref()
                                    .is_some_and(|h| h.state.readiness == Readiness::Ready);
                            HostReport {
                                host: *host,
                                ready,
                                health,
                            }
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    StatusReport {
        definitions,
        clusters: clusters(state),
        problems: desired.problems.clone(),
        probes: state.board.stats.snapshot(),
        started: state.daemon.started(),
        config_reloads: Reloads {
            succeeded: state.daemon.reloads.load(Ordering::Relaxed),
            failed: state.daemon.failed_reloads.load(Ordering::Relaxed),
        },
    }
}

fn clusters(state: &StatusState) -> Vec<ClusterStatus> {
    state
        .clusters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect()
}

/// Every route answers GET only (axum refuses other methods with 405): nothing here changes
/// the daemon.
pub fn router(state: StatusState) -> Router {
    let metrics = Arc::new(metrics::registry(state.clone()));
    Router::new()
        .route("/", get(page_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move || async move {
                match metrics::encode(&metrics) {
                    Ok(text) => {
                        ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
                    }
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }),
        )
        .route(
            "/api/v1/status",
            get(|State(state): State<StatusState>| async move { Json(report(&state)) }),
        )
        .with_state(state)
}

async fn page_handler(State(state): State<StatusState>) -> Result<Html<String>, StatusCode> {
    page::render(&report(&state), SystemTime::now())
        .map(Html)
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

/// Cheap on purpose (no per-host report): orchestrators call it every few seconds.
async fn readyz(State(state): State<StatusState>) -> impl IntoResponse {
    let (definitions, problems) = {
        let desired = state.desired.borrow();
        (desired.definitions.len(), desired.problems.len())
    };
    let verdict = ready::verdict(
        state.daemon.started(),
        definitions,
        problems,
        &clusters(&state),
    );
    let code = if verdict.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, verdict.to_string())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Serves until the process ends. Binding happens before this returns, so a taken port fails
/// the start instead of a background task.
pub async fn bind(listen: SocketAddr) -> std::io::Result<listener::Limited> {
    Ok(listener::Limited::new(
        tokio::net::TcpListener::bind(listen).await?,
    ))
}
