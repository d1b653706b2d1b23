//! The `ClusterEndpoint` CRD on the real API server: `deploy/crd.yaml` is what `endpoints-operator
//! crd` prints, it is accepted and established, the original operator's examples apply unchanged
//! (UDP data as a string or a byte list), invalid objects are refused and defaults are filled in.
//!
//! The CRD is cluster-scoped and shared by every trial (and other suites): each trial applies it
//! with server-side apply under one field manager, which is idempotent, and works in a namespace
//! of its own.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support::daemon::{binary, run_cli};
use crate::support::{Case, ControlPlane, namespace};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub fn cases() -> Vec<Case> {
    vec![
        Case::blocking("crd::deploy_crd_yaml_is_the_crd_command_output", |_| {
            committed_file_is_current()
        }),
        Case::tokio("crd::applies_and_is_established", established),
        Case::tokio(
            "crd::original_examples_apply_unchanged_with_udp_data_as_string_or_bytes",
            original_examples,
        ),
        Case::tokio("crd::invalid_objects_are_rejected_with_422", rejections),
        Case::tokio("crd::defaults_are_filled_in", defaults),
        Case::tokio("crd::status_subresource_takes_the_status", status),
    ]
}

fn committed_file_is_current() -> Result<()> {
    let (code, stdout, stderr) = run_cli(&["crd"])?;
    ensure!(code == 0, "endpoints-operator crd: exit {code}: {stderr}");
    let committed = std::fs::read_to_string(format!("{ROOT}/deploy/crd.yaml"))?;
    ensure!(
        stdout == committed,
        "deploy/crd.yaml is stale: regenerate it with `cargo run -- crd > deploy/crd.yaml`"
    );
    Ok(())
}

pub use crate::support::crd::install;

/// A namespace with a generated name, so parallel trials and reruns never collide.
pub fn endpoints(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("sealos.io", "v1beta1", "ClusterEndpoint");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "clusterendpoints");
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// A case file as a `ClusterEndpoint` object placed in `ns` (the only change made to it).
fn case_object(name: &str, ns: &str, edit: impl Fn(String) -> String) -> Result<DynamicObject> {
    let text = std::fs::read_to_string(format!("{ROOT}/tests/cases/{name}"))?;
    let mut object: DynamicObject = serde_saphyr::from_str(&edit(text))?;
    object.metadata.namespace = Some(ns.to_string());
    Ok(object)
}

fn object(value: Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(value)?)
}

/// Whether every field of `expected` is in `actual` with the same value (`actual` may have more:
/// the defaults the API server fills in).
fn subset(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| subset(v, av))),
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(e, a)| subset(e, a))
        }
        _ => expected == actual,
    }
}

async fn established(cp: &'static ControlPlane) -> Result<()> {
    let crd = install(&cp.client()).await?;
    // Applying again changes nothing (what parallel trials rely on).
    let again = install(&cp.client()).await?;
    ensure!(
        crd.metadata.generation == again.metadata.generation,
        "re-applying the same CRD bumped its generation"
    );
    let status = crd.status.context("CRD status")?;
    let names = status.accepted_names.context("accepted names")?;
    ensure!(names.kind == "ClusterEndpoint" && names.plural == "clusterendpoints");
    ensure!(
        names.short_names == Some(vec!["cep".to_string()]),
        "{names:?}"
    );
    ensure!(crd.spec.scope == "Namespaced");
    let conditions = status.conditions.unwrap_or_default();
    ensure!(
        conditions
            .iter()
            .any(|c| c.type_ == "NamesAccepted" && c.status == "True"),
        "{conditions:#?}"
    );
    // A non-structural schema or an invalid CEL rule would show here.
    ensure!(
        !conditions
            .iter()
            .any(|c| c.type_ == "NonStructuralSchema" && c.status == "True"),
        "{conditions:#?}"
    );
    Ok(())
}

async fn original_examples(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let ns = namespace::create(&client, "crd-examples").await?;
    let result = async {
        let api = endpoints(&client, &ns);
        let text_data = "This is flag data for UDP svc test";
        let as_string = case_object("seed-wordpress.yaml", &ns, |t| t)?;
        let bytes: Vec<u8> = text_data.bytes().collect();
        let as_bytes = case_object("seed-wordpress.yaml", &ns, |t| {
            t.replace("name: wordpress", "name: wordpress-bytes")
                .replace(
                    &format!("data: \"{text_data}\""),
                    &format!("data: {bytes:?}"),
                )
        })?;
        ensure!(
            as_bytes.data["spec"]["ports"][2]["udpSocket"]["data"] == json!(bytes),
            "the variant did not get a byte list: {}",
            as_bytes.data["spec"]["ports"][2]
        );
        let dir = tempfile::tempdir()?;
        for (original, data) in [(as_string, json!(text_data)), (as_bytes, json!(bytes))] {
            let name = original.metadata.name.clone().context("name")?;
            api.create(&PostParams::default(), &original)
                .await
                .with_context(|| format!("creating {name}"))?;
            let stored = api.get(&name).await?;
            let udp = &stored.data["spec"]["ports"][2]["udpSocket"]["data"];
            ensure!(*udp == data, "{name}: udpSocket.data read back as {udp}");
            ensure!(
                subset(&original.data["spec"], &stored.data["spec"]),
                "{name}: the stored spec lost or changed fields:\nsent   {}\nstored {}",
                original.data["spec"],
                stored.data["spec"]
            );
            // What the API server returns (defaults filled in, server metadata) is still a valid
            // definition for the daemon.
            let file = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&file, serde_json::to_string(&stored)?)?;
            let out = Command::new(binary())
                .arg("check")
                .arg(&file)
                .env("KUBECONFIG", cp.kubeconfig_path())
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                out.status.success() && stdout.contains("0 problem(s)"),
                "{name}: check of the stored object: {stdout}{stderr}"
            );
        }
        Ok(())
    }
    .await;
    let _ = namespace::delete(&client, &ns).await;
    result
}

fn port(extra: Value) -> Value {
    let mut port = json!({"name": "pg", "port": 5432, "hosts": ["192.0.2.10"]});
    port.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    port
}

fn definition(name: &str, spec: Value) -> Result<DynamicObject> {
    object(json!({
        "apiVersion": "sealos.io/v1beta1",
        "kind": "ClusterEndpoint",
        "metadata": {"name": name},
        "spec": spec,
    }))
}

async fn rejections(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let ns = namespace::create(&client, "crd-rejections").await?;
    let result = async {
        let api = endpoints(&client, &ns);
        let one = |fields: Value| json!({"ports": [port(fields)]});
        let udp = |data: Value| {
            one(json!({"protocol": "UDP", "udpSocket": {"enable": true, "data": data}}))
        };
        let field = |name: &str| format!("spec.ports[0].{name}");
        let bad = [
            (
                "period-zero",
                json!({"periodSeconds": 0, "ports": [port(json!({}))]}),
                "spec.periodSeconds".to_string(),
            ),
            ("port-high", one(json!({"port": 70000})), field("port")),
            ("port-zero", one(json!({"port": 0})), field("port")),
            (
                "target-high",
                one(json!({"targetPort": 65536})),
                field("targetPort"),
            ),
            (
                "timeout-zero",
                one(json!({"timeoutSeconds": 0})),
                field("timeoutSeconds"),
            ),
            (
                "success-zero",
                one(json!({"successThreshold": 0})),
                field("successThreshold"),
            ),
            (
                "failure-zero",
                one(json!({"failureThreshold": 0})),
                field("failureThreshold"),
            ),
            (
                "duplicate-names",
                json!({"ports": [port(json!({})), port(json!({"port": 5433}))]}),
                "spec.ports[1]".to_string(),
            ),
            (
                "two-unnamed",
                json!({"ports": [{"port": 1, "hosts": []}, {"port": 2, "hosts": []}]}),
                "spec.ports[1]".to_string(),
            ),
        ];
        let mut wrong = Vec::new();
        for (name, spec, field) in bad {
            match api
                .create(&PostParams::default(), &definition(name, spec)?)
                .await
            {
                Err(kube::Error::Api(status)) if status.code == 422 => {
                    if !status.message.contains(&field) {
                        wrong.push(format!("{name}: 422 without {field}: {}", status.message));
                    }
                }
                other => wrong.push(format!("{name}: expected 422, got {other:?}")),
            }
        }
        ensure!(wrong.is_empty(), "{wrong:#?}");

        // What the rules must still let through: one unnamed port (the list-map key defaults to
        // ""), and UDP data as text, bytes, empty or absent.
        let good = [
            (
                "one-unnamed",
                json!({"ports": [{"port": 80, "hosts": ["192.0.2.1"]}]}),
            ),
            ("udp-empty-list", udp(json!([]))),
            ("udp-bytes", udp(json!([0, 255]))),
            ("udp-text", udp(json!("ping"))),
            (
                "udp-no-data",
                one(json!({"protocol": "UDP", "udpSocket": {"enable": true}})),
            ),
        ];
        for (name, spec) in good {
            api.create(&PostParams::default(), &definition(name, spec)?)
                .await
                .with_context(|| format!("creating {name}"))?;
        }
        let stored = api.get("one-unnamed").await?;
        ensure!(
            stored.data["spec"]["ports"][0]["name"] == "",
            "{}",
            stored.data["spec"]
        );
        Ok(())
    }
    .await;
    let _ = namespace::delete(&client, &ns).await;
    result
}

async fn defaults(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let ns = namespace::create(&client, "crd-defaults").await?;
    let result = async {
        let api = endpoints(&client, &ns);
        let expected = |stored: &DynamicObject| {
            let spec = &stored.data["spec"];
            let port = &spec["ports"][0];
            ensure!(spec["periodSeconds"] == 10, "{spec}");
            ensure!(port["timeoutSeconds"] == 1, "{spec}");
            ensure!(port["successThreshold"] == 1, "{spec}");
            ensure!(port["failureThreshold"] == 3, "{spec}");
            ensure!(port.get("targetPort").is_none(), "{spec}");
            Ok(())
        };
        let created = api
            .create(
                &PostParams::default(),
                &definition(
                    "absent",
                    json!({"ports": [port(json!({"tcpSocket": {"enable": true}}))]}),
                )?,
            )
            .await?;
        expected(&created)?;
        expected(&api.get("absent").await?)?;
        // An explicit null (what a client serializing `None` sends) is defaulted the same way.
        let created = api
            .create(
                &PostParams::default(),
                &definition(
                    "null",
                    json!({"periodSeconds": null, "ports": [port(json!({
                        "timeoutSeconds": null, "successThreshold": null, "failureThreshold": null
                    }))]}),
                )?,
            )
            .await?;
        expected(&created)?;
        // Set values are kept.
        let created = api
            .create(
                &PostParams::default(),
                &definition(
                    "set",
                    json!({"periodSeconds": 3, "ports": [port(json!({}))]}),
                )?,
            )
            .await?;
        ensure!(created.data["spec"]["periodSeconds"] == 3);
        Ok(())
    }
    .await;
    let _ = namespace::delete(&client, &ns).await;
    result
}

async fn status(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let ns = namespace::create(&client, "crd-status").await?;
    let result = async {
        let api = endpoints(&client, &ns);
        api.create(
            &PostParams::default(),
            &definition(
                "db",
                json!({"ports": [port(json!({"tcpSocket": {"enable": true}}))]}),
            )?,
        )
        .await?;
        let status = json!({
            "phase": "Healthy",
            "readyHosts": "1/1",
            "observedGeneration": 1,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Probed", "message": "",
                "lastTransitionTime": "2025-01-01T00:00:00Z"
            }],
            "ports": [{"name": "pg", "hosts": [{
                "host": "192.0.2.10", "ready": true, "since": "2025-01-01T00:00:00Z",
                "lastResult": "success", "consecutiveSuccesses": 4, "consecutiveFailures": 0
            }]}]
        });
        api.patch_status(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .context("writing the status")?;
        let stored = api.get("db").await?;
        ensure!(
            subset(&status, &stored.data["status"]),
            "status read back as {}",
            stored.data["status"]
        );
        // The status is only written through the subresource.
        let mut changed = stored.clone();
        changed.data["status"]["phase"] = json!("UnHealthy");
        changed.data["spec"]["periodSeconds"] = json!(5);
        let replaced = api.replace("db", &PostParams::default(), &changed).await?;
        ensure!(replaced.data["status"]["phase"] == "Healthy");
        ensure!(replaced.data["spec"]["periodSeconds"] == 5);
        Ok(())
    }
    .await;
    let _ = namespace::delete(&client, &ns).await;
    result
}
