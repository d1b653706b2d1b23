//! Kubernetes clients for configured clusters, with bounded waits on every request.

use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::config::ClusterConfig;

/// No byte from the API server for this long fails a request.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Watches ask the API server to end them after this long, inside [`READ_TIMEOUT`]: a quiet
/// watch then ends cleanly and is resumed, instead of failing as a timed-out read.
pub const WATCH_TIMEOUT_SECS: u32 = 10;

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
    config.read_timeout = Some(READ_TIMEOUT);
    config.write_timeout = Some(Duration::from_secs(15));
    Ok(Client::try_from(config)?)
}
