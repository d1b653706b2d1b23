//! Scratch namespaces on the shared API server: generated names, so reruns and parallel trials
//! never collide.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

/// Creates a namespace named `<prefix>-<random>` and returns its name.
pub async fn create(client: &Client, prefix: &str) -> Result<String> {
    let mut ns = Namespace::default();
    ns.metadata.generate_name = Some(format!("{prefix}-"));
    let ns = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    ns.metadata
        .name
        .context("the API server named the namespace")
}

/// Deletes a namespace (the namespace controller removes what is in it).
pub async fn delete(client: &Client, name: &str) -> Result<()> {
    Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(())
}
