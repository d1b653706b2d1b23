//! Who writes to a cluster. Without leader election, this daemon. With it, per target cluster,
//! the holder of a Lease named after the instance: only the holder writes to that cluster, the others keep probing and take over when the Lease expires (a
//! killed leader) or is released (a leader shutting down). One Lease per cluster also lets two
//! bastion daemons split clusters between them rather than fight over any.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{ClusterSink, ClusterStatus};
use crate::config::LeaderElectionConfig;
use crate::model::{DefinitionKey, Desired};
use crate::probe::HealthBoard;

/// Renewal this long before expiry.
const GRACE_SECONDS: u64 = 5;

/// Where the service account of a daemon running in a cluster says it lives.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

pub struct Leadership {
    /// Whether this daemon holds the Lease now.
    pub leading: watch::Receiver<bool>,
    manager:
        JoinHandle<Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>>,
    lease: String,
}

/// The Lease's name for an instance: daemons of one instance compete, others never meet.
pub fn lease_name(instance: &str) -> String {
    format!("endpoints-operator-{instance}")
}

/// The namespace of the Lease: configured, else the daemon's own, else `default`.
pub fn lease_namespace(config: &LeaderElectionConfig) -> String {
    config.namespace.clone().unwrap_or_else(|| {
        std::fs::read_to_string(POD_NAMESPACE_FILE)
            .map(|ns| ns.trim().to_string())
            .ok()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".into())
    })
}

/// Who this daemon is on a Lease: host name and process id, readable in `kubectl get lease`.
pub fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{host}-{}", std::process::id())
}

/// Starts competing for the cluster's Lease (creating it when missing).
pub async fn elect(
    cluster: &str,
    client: Client,
    config: &LeaderElectionConfig,
    instance: &str,
) -> anyhow::Result<Leadership> {
    let lease = lease_name(instance);
    let namespace = lease_namespace(config);
    let manager = LeaseManagerBuilder::new(client, &lease)
        .with_namespace(&namespace)
        .with_identity(identity())
        .with_duration(config.lease_seconds)
        .with_grace(GRACE_SECONDS)
        .with_field_manager(format!("{}-lease", crate::render::FIELD_MANAGER))
        .build()
        .await?;
    let (leading, manager) = manager.watch().await;
    info!(%cluster, lease = %format!("{namespace}/{lease}"), "competing for leadership");
    Ok(Leadership {
        leading,
        manager,
        lease,
    })
}

impl Leadership {
    /// Lets go of the Lease (if held), so a standby takes over at once instead of after expiry.
    pub async fn release(self) {
        drop(self.leading);
        match tokio::time::timeout(Duration::from_secs(5), self.manager).await {
            Ok(Ok(Ok(_))) => info!(lease = %self.lease, "leadership released"),
            Ok(Ok(Err(e))) => warn!(lease = %self.lease, error = %e, "releasing the Lease failed"),
            _ => warn!(lease = %self.lease, "releasing the Lease took too long"),
        }
    }
}

/// What a cluster's writer needs: a sink is built from it each time this daemon may write.
pub struct Writer {
    pub name: String,
    pub instance: String,
    pub client: kube::Client,
    pub board: Arc<HealthBoard>,
    pub status: Arc<Mutex<ClusterStatus>>,
    pub desired: watch::Receiver<Arc<Desired>>,
    pub changes: broadcast::Sender<DefinitionKey>,
}

impl Writer {
    fn spawn_sink(&self) -> JoinHandle<()> {
        let sink = ClusterSink::new(
            self.name.clone(),
            self.instance.clone(),
            self.client.clone(),
            self.board.clone(),
            self.status.clone(),
        );
        tokio::spawn(sink.run(self.desired.clone(), self.changes.subscribe()))
    }

    /// Writes until told to stop.
    pub async fn write(self, mut stop: watch::Receiver<bool>) {
        let sink = self.spawn_sink();
        let _ = stop.wait_for(|s| *s).await;
        sink.abort();
    }

    /// Writes only while holding the cluster's Lease; competes again when it is lost, and
    /// releases it when told to stop.
    pub async fn lead(self, election: LeaderElectionConfig, mut stop: watch::Receiver<bool>) {
        let set = |leading: bool| {
            self.status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .leading = Some(leading);
        };
        set(false);
        let mut backoff = Duration::from_secs(1);
        let mut leadership = loop {
            match elect(&self.name, self.client.clone(), &election, &self.instance).await {
                Ok(leadership) => break leadership,
                Err(e) => {
                    let error = format!("leader election: {e:#}");
                    warn!(cluster = %self.name, %error, "cannot compete for leadership; retrying");
                    self.status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_error = Some(error);
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        };
        let mut sink: Option<JoinHandle<()>> = None;
        loop {
            let leading = *leadership.leading.borrow_and_update();
            match (leading, &sink) {
                (true, None) => {
                    info!(cluster = %self.name, "leading: this daemon writes to the cluster");
                    set(true);
                    sink = Some(self.spawn_sink());
                }
                (false, Some(task)) => {
                    warn!(cluster = %self.name, "leadership lost: writing stops");
                    task.abort();
                    sink = None;
                    set(false);
                }
                _ => {}
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                changed = leadership.leading.changed() => if changed.is_err() { break },
            }
        }
        if let Some(task) = sink {
            task.abort();
        }
        leadership.release().await;
    }
}
