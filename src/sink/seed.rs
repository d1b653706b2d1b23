//! What a cluster already shows as ready. On start the daemon trusts it until a host's own probes
//! say otherwise, so a restart or upgrade never flaps healthy hosts to not ready.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::model::DefinitionKey;
use crate::probe::ServiceHost;
use crate::render::{SERVICE_NAME_LABEL, SLICE_CONTROLLER, SLICE_MANAGED_BY_LABEL};

/// Hosts marked ready in the EndpointSlices this daemon manages. Bounded by `timeout`: an
/// unreachable cluster just contributes nothing.
pub async fn ready_hosts(client: Client, timeout: Duration) -> Vec<ServiceHost> {
    try_ready_hosts(client, timeout).await.unwrap_or_default()
}

/// Why a cluster gave no list of ready hosts.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl SeedError {
    /// The API server answered, if only to refuse.
    pub fn answered(&self) -> bool {
        matches!(self, SeedError::Kube(kube::Error::Api(_)))
    }
}

/// Like [`ready_hosts`], saying why when the cluster gave no list: the daemon's first word from
/// each cluster.
pub async fn try_ready_hosts(
    client: Client,
    timeout: Duration,
) -> Result<Vec<ServiceHost>, SeedError> {
    let api: Api<EndpointSlice> = Api::all(client);
    let params =
        ListParams::default().labels(&format!("{SLICE_MANAGED_BY_LABEL}={SLICE_CONTROLLER}"));
    let slices = tokio::time::timeout(timeout, api.list(&params))
        .await
        .map_err(|_| SeedError::NoAnswer(timeout))??;
    Ok(slices.items.iter().flat_map(ready_in_slice).collect())
}

fn ready_in_slice(slice: &EndpointSlice) -> Vec<ServiceHost> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    let (Some(namespace), Some(service)) = (&slice.metadata.namespace, service) else {
        return Vec::new();
    };
    // Our slices carry exactly one port, named like the definition's port.
    let port = slice
        .ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| p.name.clone())
        .unwrap_or_default();
    let definition = DefinitionKey {
        namespace: namespace.clone(),
        name: service.clone(),
    };
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()))
        .map(|host| (definition.clone(), port.clone(), host))
        .collect()
}
