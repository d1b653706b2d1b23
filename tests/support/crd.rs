//! The project's CRD (`deploy/crd.yaml`) on a test cluster.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

pub const CRD_NAME: &str = "clusterendpoints.sealos.io";

/// Applies `deploy/crd.yaml` (server-side under one field manager, so idempotent) and waits
/// until it is Established.
pub async fn install(client: &Client) -> Result<CustomResourceDefinition> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crd.yaml");
    let text = std::fs::read_to_string(path)?;
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("endpoints-operator-crd-test").force();
    // Trials that create it at the same moment may see 409 (already exists): apply again.
    let mut attempts = 0;
    while let Err(e) = crds.patch(CRD_NAME, &params, &Patch::Apply(&crd)).await {
        attempts += 1;
        match e {
            kube::Error::Api(status) if status.code == 409 && attempts < 5 => {}
            e => return Err(e).context("applying deploy/crd.yaml"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = crds.get(CRD_NAME).await?;
        let conditions = crd.status.as_ref().and_then(|s| s.conditions.clone());
        let established = conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(crd);
        }
        if Instant::now() > deadline {
            bail!("the CRD is not Established after 30 s: {conditions:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
