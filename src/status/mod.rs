//! The status server: `/healthz` (alive) and `/api/v1/status` (every definition, port and host
//! with its health, the per-cluster apply state, and the problems found in the sources).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::model::{Desired, Problem};
use crate::probe::state::Readiness;
use crate::probe::{HealthBoard, StatsSnapshot, TargetHealth, TargetKey};
use crate::sink::ClusterStatus;

#[derive(Clone)]
pub struct StatusState {
    pub desired: watch::Receiver<Arc<Desired>>,
    pub board: Arc<HealthBoard>,
    pub clusters: SharedClusters,
}

/// The status of each configured cluster; the list changes when the config is reloaded.
pub type SharedClusters = Arc<Mutex<Vec<Arc<Mutex<ClusterStatus>>>>>;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub definitions: Vec<DefinitionReport>,
    pub clusters: Vec<ClusterStatus>,
    pub problems: Vec<Problem>,
    pub probes: StatsSnapshot,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefinitionReport {
    pub namespace: String,
    pub name: String,
    pub origin: String,
    pub ports: Vec<PortReport>,
}

#[derive(Serialize)]
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostReport {
    pub host: IpAddr,
    pub ready: bool,
    #[serde(flatten)]
    pub health: Option<TargetHealth>,
}

pub fn report(state: &StatusState) -> StatusReport {
    let desired = state.desired.borrow().clone();
    let health = state.board.snapshot();
    let definitions = desired
        .definitions
        .values()
        .map(|def| DefinitionReport {
            namespace: def.key.namespace.clone(),
            name: def.key.name.clone(),
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
                            let health = health.get(&key).cloned();
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
    let clusters = state
        .clusters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    StatusReport {
        definitions,
        clusters,
        problems: desired.problems.clone(),
        probes: state.board.stats.snapshot(),
    }
}

pub fn router(state: StatusState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/api/v1/status",
            get(|State(state): State<StatusState>| async move { Json(report(&state)) }),
        )
        .with_state(state)
}

/// Serves until the process ends. Binding happens before this returns, so a taken port fails
/// the start instead of a background task.
pub async fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await
}
