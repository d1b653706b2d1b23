//! What ships beside the binary: the example config, the systemd unit and the deploy manifests,
//! checked against the code and the real tools so they cannot drift.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope};
use kube::{Api, ResourceExt};

use crate::support::daemon::{binary, run_cli};
use crate::support::{Case, ControlPlane};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub fn cases() -> Vec<Case> {
    vec![
        Case::blocking(
            "packaging::the_example_config_and_definitions_pass_check",
            example_config,
        ),
        Case::blocking(
            "packaging::the_systemd_unit_passes_systemd_analyze_verify",
            |_| systemd_unit(),
        ),
        Case::tokio(
            "packaging::deploy_manifests_apply_and_grant_exactly_what_the_daemon_uses",
            deploy_manifests,
        ),
    ]
}

fn example_config(cp: &ControlPlane) -> Result<()> {
    // The example names a kubeconfig under /etc; point it at the test cluster's, so `check`
    // also proves it reads kubeconfig files and finds the context.
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(format!("{ROOT}/config/config.toml"))?;
    let text = text
        .replace(
            "/etc/endpoints-operator/kubeconfig",
            &cp.kubeconfig_path().display().to_string(),
        )
        .replace(
            "paths = [\"endpoints.d\"]",
            &format!("paths = [\"{ROOT}/config/endpoints.d\"]"),
        );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text)?;
    let (code, stdout, stderr) = run_cli(&["check", "--config", &config.display().to_string()])?;
    ensure!(code == 0, "{stdout}{stderr}");
    ensure!(
        stdout.contains("2 definition(s)") && stdout.contains("0 problem(s)"),
        "{stdout}"
    );
    // Unchanged, its kubeconfig does not exist here, and `check` says so.
    let (code, _, stderr) = run_cli(&["check", "--config", &format!("{ROOT}/config/config.toml")])?;
    ensure!(
        code == 1 && stderr.contains("/etc/endpoints-operator/kubeconfig"),
        "{stderr}"
    );
    Ok(())
}

fn systemd_unit() -> Result<()> {
    // verify needs the ExecStart binary to exist: point the unit at the one cargo built.
    let dir = tempfile::tempdir()?;
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/endpoints-operator.service"))?;
    let unit = unit.replace(
        "/usr/local/bin/endpoints-operator",
        &binary().display().to_string(),
    );
    let path = dir.path().join("endpoints-operator.service");
    std::fs::write(&path, unit)?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .context("running systemd-analyze (package systemd)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    Ok(())
}

async fn deploy_manifests(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/endpoints-operator.yaml"))?;
    let objects: Vec<DynamicObject> = serde_saphyr::from_multiple(&text)?;
    let discovery = Discovery::new(client.clone()).run().await?;
    for object in &objects {
        let types = object.types.clone().context("apiVersion/kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types)?;
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .with_context(|| format!("unknown kind {gvk:?}"))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                &object.namespace().context("namespace")?,
                &resource,
            ),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &object.name_any(),
            &PatchParams::apply("packaging-test"),
            &Patch::Apply(object),
        )
        .await
        .with_context(|| format!("applying {} {}", types.kind, object.name_any()))?;
    }

    let user = "system:serviceaccount:endpoints-operator:endpoints-operator";
    let reviews: Api<SubjectAccessReview> = Api::all(client);
    // `resource` may name a subresource as RBAC rules do: `clusterendpoints/status`.
    let allowed = |group: &str, resource: &str, verb: &str| {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_string())),
            None => (resource, None),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.into()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource,
                    verb: Some(verb.into()),
                    namespace: Some("default".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviews = reviews.clone();
        async move {
            Ok::<_, anyhow::Error>(
                reviews
                    .create(&PostParams::default(), &review)
                    .await?
                    .status
                    .is_some_and(|s| s.allowed),
            )
        }
    };
    let core = ["get", "list", "watch", "patch", "delete"];
    let granted: [(&str, &str, &[&str]); 6] = [
        ("", "services", &core),
        ("", "endpoints", &core),
        ("discovery.k8s.io", "endpointslices", &core),
        // Watched; patched only to drop the original operator's finalizer.
        (
            "sealos.io",
            "clusterendpoints",
            &["get", "list", "watch", "patch"],
        ),
        ("sealos.io", "clusterendpoints/status", &["patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ];
    for (group, resource, verbs) in granted {
        for verb in verbs {
            ensure!(
                allowed(group, resource, verb).await?,
                "{verb} {group}/{resource} must be allowed"
            );
        }
    }
    for (group, resource, verb) in [
        ("", "secrets", "get"),
        ("", "pods", "list"),
        ("", "services", "deletecollection"),
        ("apps", "deployments", "patch"),
        // No finalizer of its own, and never deletes or rewrites a user's object.
        ("sealos.io", "clusterendpoints", "update"),
        ("sealos.io", "clusterendpoints", "delete"),
        ("sealos.io", "clusterendpoints", "create"),
        ("sealos.io", "clusterendpoints/status", "update"),
        ("sealos.io", "clusterendpoints/finalizers", "update"),
        ("events.k8s.io", "events", "delete"),
        ("", "events", "create"),
    ] {
        ensure!(
            !allowed(group, resource, verb).await?,
            "{verb} {group}/{resource} must be denied"
        );
    }
    Ok(())
}
