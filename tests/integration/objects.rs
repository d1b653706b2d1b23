//! `ClusterEndpoint` objects as a source (`sources.crd = true`) on the real control plane, with
//! the garbage collector of kube-controller-manager running: status and Events, ownership and
//! deletion without the daemon, adoption of hand-made Services, `clusterIP` changes, fan-out to
//! another cluster, and one precedence rule between files and objects with gapless handover.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::crd::{endpoints, install};
use crate::daemon::{Scratch, expect, readiness, slices_become};
use crate::support::daemon::Daemon;
use crate::support::{Case, ControlPlane, Host, TestNet, watch};

const WAIT: Duration = Duration::from_secs(30);

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "objects::an_object_is_applied_owned_and_reports_per_host_health_and_events",
            applied_with_status,
        ),
        Case::tokio(
            "objects::deleting_an_object_and_its_namespace_needs_no_daemon",
            deletion_without_daemon,
        ),
        Case::tokio(
            "objects::the_original_operators_finalizer_does_not_block_deletion",
            legacy_finalizer,
        ),
        Case::tokio(
            "objects::a_hand_made_service_is_adopted_keeping_its_cluster_ip_and_headless_switches_recreate",
            adoption_and_cluster_ip,
        ),
        Case::tokio(
            "objects::case_selector_service_is_left_alone_and_the_object_says_why",
            selector_service,
        ),
        Case::tokio(
            "objects::a_file_wins_over_an_object_and_either_removal_hands_over_without_a_gap",
            file_and_object,
        ),
        Case::tokio(
            "objects::invalid_parts_of_an_object_are_reported_in_its_status",
            invalid_objects,
        ),
        Case::tokio(
            "objects::a_restart_neither_flaps_hosts_nor_rewrites_status",
            restart,
        ),
        Case::tokio(
            "objects::an_object_fans_out_to_another_cluster_and_is_pruned_there",
            fan_out,
        ),
        Case::tokio(
            "objects::an_object_made_unusable_while_stopped_keeps_its_objects",
            unusable_while_stopped,
        ),
        Case::tokio(
            "objects::a_selector_given_later_to_a_managed_service_is_refused_and_its_slices_go",
            selector_given_later,
        ),
        Case::tokio(
            "objects::an_object_deleted_and_created_again_at_once_gets_its_own_status",
            recreated_at_once,
        ),
        Case::tokio(
            "objects::case_seed_wordpress_runs_unchanged_from_a_file_and_as_an_object",
            seed_wordpress_runs,
        ),
    ]
}

/// A ClusterEndpoint with one TCP port 80 → 8080 on `hosts`, probed every second.
fn web_object(name: &str, ns: &str, hosts: &[&Host], extra: Value) -> Result<DynamicObject> {
    let hosts: Vec<String> = hosts.iter().map(|h| h.ip().to_string()).collect();
    let mut value = json!({
        "apiVersion": "sealos.io/v1beta1",
        "kind": "ClusterEndpoint",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "periodSeconds": 1,
            "ports": [{
                "name": "http", "port": 80, "targetPort": 8080, "hosts": hosts,
                "tcpSocket": {"enable": true}, "timeoutSeconds": 1,
                "failureThreshold": 2, "successThreshold": 1
            }]
        }
    });
    merge(&mut value, extra);
    Ok(serde_json::from_value(value)?)
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// Waits until the named object's status satisfies `done`.
async fn status_until(
    api: &Api<DynamicObject>,
    name: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<DynamicObject> {
    let found = watch::until(api.clone(), "", WAIT, |objects| {
        objects.get(name).is_some_and(|o| done(&o.data["status"]))
    })
    .await;
    if found.is_err() {
        let now = api.get_opt(name).await?.map(|o| o.data["status"].clone());
        let now = now.unwrap_or_default();
        return found
            .map(|_| unreachable!())
            .with_context(|| format!("waiting for the status of {name}, which is now {now:#}"));
    }
    found?.get(name).cloned().context("object")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Waits for an Event about `kind`/`name` with `reason` whose note contains `note`.
async fn event_until(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    reason: &str,
    note: &str,
) -> Result<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let matches = |e: &Event| {
        let about = e.regarding.as_ref();
        about.and_then(|r| r.kind.as_deref()) == Some(kind)
            && about.and_then(|r| r.name.as_deref()) == Some(name)
            && e.reason.as_deref() == Some(reason)
            && e.note.as_deref().unwrap_or_default().contains(note)
    };
    let events = watch::until(api, "", WAIT, |events| events.values().any(matches))
        .await
        .with_context(|| format!("waiting for a {reason} Event on {kind} {name}"))?;
    events.into_values().find(matches).context("event")
}

async fn gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    if let Err(e) = watch::until(api.clone(), "", WAIT, |objects| !objects.contains_key(name)).await
    {
        let left = api.get_opt(name).await?;
        return Err(e.context(format!("{name} did not go: {left:#?}")));
    }
    Ok(())
}

/// Ready addresses across the Service's slices.
fn ready_hosts(slices: &BTreeMap<String, EndpointSlice>) -> Vec<String> {
    readiness(slices)
        .into_iter()
        .filter(|(_, ready)| *ready)
        .map(|((_, address), _)| address)
        .collect()
}

async fn applied_with_status(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _server1 = h1.serve_tcp(8080)?;
    let server2 = h2.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-status").await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    let labels = json!({"metadata": {"labels": {"team": "payments"}}});
    let created = api
        .create(
            &PostParams::default(),
            &web_object("web", &s.ns, &[&h1, &h2], labels)?,
        )
        .await?;
    let uid = created.metadata.uid.clone().context("uid")?;

    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, WAIT)
        .await
        .with_context(|| daemon.log_tail(60))?;
    let service = s.api::<Service>().get("web").await?;
    let owners = service
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    ensure!(
        owners.len() == 1
            && owners[0].uid == uid
            && owners[0].kind == "ClusterEndpoint"
            && owners[0].block_owner_deletion != Some(true),
        "the Service is owned by its object: {owners:?}"
    );
    let labels = service.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get("team").map(String::as_str) == Some("payments")
            && labels
                .get("endpoints-operator.sealos.io/source")
                .map(String::as_str)
                == Some("crd"),
        "{labels:?}"
    );
    let generation = created.metadata.generation;
    let healthy = status_until(&api, "web", |s| s["phase"] == "Healthy").await?;
    let status = &healthy.data["status"];
    ensure!(status["readyHosts"] == "2/2", "{status:#}");
    ensure!(
        status["observedGeneration"].as_i64() == generation,
        "{status:#}"
    );
    for type_ in [
        "Initialized",
        "SyncServiceReady",
        "SyncEndpointReady",
        "Ready",
    ] {
        ensure!(
            condition(status, type_)["status"] == "True",
            "{type_}: {status:#}"
        );
    }

    // At rest the status is not rewritten: probes keep coming, the object stays as it is.
    let version = healthy.metadata.resource_version.clone();
    let probes = |status: &Value| status["probes"]["probesTotal"].as_u64().unwrap_or_default();
    let start = probes(&daemon.status().await?);
    watch::never(api.clone(), "", Duration::from_secs(4), |objects| {
        objects
            .get("web")
            .is_some_and(|o| o.metadata.resource_version != version)
    })
    .await
    .context("the object was rewritten at rest")?;
    let probed = probes(&daemon.status().await?) - start;
    ensure!(probed >= 6, "only {probed} probes while waiting");

    server2.stop();
    let one = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, false),
    ]);
    slices_become(&s, "web", &one, WAIT).await?;
    let h2_ip = h2.ip().to_string();
    let unhealthy = status_until(&api, "web", |s| s["phase"] == "UnHealthy").await?;
    let status = &unhealthy.data["status"];
    ensure!(status["readyHosts"] == "1/2", "{status:#}");
    let ready = condition(status, "Ready");
    ensure!(
        ready["status"] == "False"
            && ready["reason"] == "HostsNotReady"
            && ready["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&h2_ip),
        "{ready:#}"
    );
    let host = status["ports"][0]["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["host"] == h2_ip.as_str()))
        .cloned()
        .unwrap_or_default();
    ensure!(
        host["ready"] == false
            && host["consecutiveFailures"] == 2
            && host["lastError"].is_string()
            && host["since"].is_string(),
        "{host:#}"
    );
    for kind in ["ClusterEndpoint", "Service"] {
        let event = event_until(&client, &s.ns, kind, "web", "HostNotReady", &h2_ip).await?;
        ensure!(event.type_.as_deref() == Some("Warning"), "{event:?}");
    }
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn deletion_without_daemon(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-gc").await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    for name in ["first", "second"] {
        api.create(
            &PostParams::default(),
            &web_object(name, &s.ns, &[&h1], json!({}))?,
        )
        .await?;
        let ready = BTreeMap::from([((format!("{name}-80-tcp-ipv4"), h1.ip().to_string()), true)]);
        slices_become(&s, name, &ready, WAIT).await?;
    }
    ensure!(daemon.stop()? == Some(0), "the daemon did not stop cleanly");

    // With no daemon at all, deleting the object deletes what it made.
    api.delete("first", &DeleteParams::default()).await?;
    gone(&api, "first").await?;
    gone(&s.api::<Service>(), "first").await?;
    gone(&s.api::<Endpoints>(), "first").await?;
    let slices = s.api::<EndpointSlice>();
    watch::until(slices, "kubernetes.io/service-name=first", WAIT, |slices| {
        slices.is_empty()
    })
    .await
    .context("slices of the deleted object")?;
    ensure!(
        s.api::<Service>().get_opt("second").await?.is_some(),
        "the other object's Service stays"
    );

    // And the namespace, with an object still in it, goes away.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(&s.ns, &DeleteParams::default()).await?;
    gone(&namespaces, &s.ns)
        .await
        .context("the namespace never went away")?;
    Ok(())
}

async fn legacy_finalizer(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-finalizer").await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    let finalizers = json!({"metadata": {"finalizers": ["sealos.io/cluster-endpoints.finalizers", "example.com/keep"]}});
    api.create(
        &PostParams::default(),
        &web_object("old", &s.ns, &[&h1], finalizers)?,
    )
    .await?;
    let ready = expect(&[("old-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "old", &ready, WAIT).await?;
    api.delete("old", &DeleteParams::default()).await?;
    // The original's finalizer goes; somebody else's stays until they remove it.
    let left = watch::until(api.clone(), "", WAIT, |objects| {
        objects.get("old").is_some_and(|o| {
            o.metadata.finalizers.as_deref() == Some(&["example.com/keep".to_string()][..])
        })
    })
    .await
    .context("the original operator's finalizer was not removed")?;
    ensure!(left["old"].metadata.deletion_timestamp.is_some());
    api.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    gone(&api, "old").await?;
    gone(&s.api::<Service>(), "old").await?;
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn adoption_and_cluster_ip(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "objects-adopt").await?;
    // What users of the original made by hand: a selectorless Service (with a port the
    // definition does not have) and Endpoints, written by another field manager.
    let hand = PatchParams::apply("kubectl").force();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": s.ns, "labels": {"owner": "dba-team"}},
        "spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "legacy", "port": 9999, "protocol": "TCP"}
        ]}
    });
    let before = s
        .api::<Service>()
        .patch("web", &hand, &Patch::Apply(&service))
        .await?;
    let endpoints_obj = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "web", "namespace": s.ns},
        "subsets": [{"addresses": [{"ip": h1.ip().to_string()}], "ports": [{"name": "http", "port": 8080}]}]
    });
    s.api::<Endpoints>()
        .patch("web", &hand, &Patch::Apply(&endpoints_obj))
        .await?;
    let cluster_ip = before
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .context("clusterIP")?;

    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    api.create(
        &PostParams::default(),
        &web_object("web", &s.ns, &[&h1, &h2], json!({}))?,
    )
    .await?;
    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, WAIT).await?;
    let hosts = |e: &Endpoints| -> Vec<String> {
        e.subsets
            .iter()
            .flatten()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| a.ip.clone())
            .collect()
    };
    let wanted = vec![h1.ip().to_string(), h2.ip().to_string()];
    let adopted = watch::until(s.api::<Endpoints>(), "", WAIT, |e| {
        e.get("web").is_some_and(|e| hosts(e) == wanted)
    })
    .await
    .context("the Endpoints were not taken over")?;
    let labels = adopted["web"].metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels
            .get("endpointslice.kubernetes.io/skip-mirror")
            .map(String::as_str)
            == Some("true"),
        "{labels:?}"
    );
    let after = s.api::<Service>().get("web").await?;
    let spec = after.spec.clone().unwrap_or_default();
    ensure!(
        spec.cluster_ip.as_deref() == Some(cluster_ip.as_str()),
        "clusterIP changed: {:?} → {:?}",
        cluster_ip,
        spec.cluster_ip
    );
    ensure!(
        after.metadata.uid == before.metadata.uid,
        "the Service was recreated"
    );
    let ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
    ensure!(
        ports == [80],
        "the Service's ports are the definition's: {ports:?}"
    );
    let labels = after.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get("owner").map(String::as_str) == Some("dba-team"),
        "another owner's label was removed: {labels:?}"
    );

    // clusterIP is immutable: switching to headless and back recreates the Service.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"clusterIP": "None"}})),
    )
    .await?;
    let headless = watch::until(s.api::<Service>(), "", WAIT, |svcs| {
        svcs.get("web")
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.cluster_ip.as_deref())
            == Some("None")
    })
    .await
    .context("the Service never became headless")?;
    ensure!(headless["web"].metadata.uid != before.metadata.uid);
    event_until(
        &client,
        &s.ns,
        "ClusterEndpoint",
        "web",
        "Recreated",
        "None",
    )
    .await?;
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"clusterIP": null}})),
    )
    .await?;
    watch::until(s.api::<Service>(), "", WAIT, |svcs| {
        let ip = svcs
            .get("web")
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.cluster_ip.clone());
        ip.is_some_and(|ip| ip != "None" && !ip.is_empty())
    })
    .await
    .context("the Service never got a cluster IP back")?;
    slices_become(&s, "web", &both, WAIT).await?;
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn selector_service(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-selector").await?;
    let text = s.localize(&crate::daemon::case_file("selector-service.yaml"), &[&h1]);
    let mut docs = text.split("\n---\n");
    let service: Service = serde_saphyr::from_str(docs.next().context("service document")?)?;
    let object: DynamicObject =
        serde_saphyr::from_str(docs.next().context("definition document")?)?;
    let created = s
        .api::<Service>()
        .create(&PostParams::default(), &service)
        .await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    let name = object.metadata.name.clone().context("name")?;
    api.create(&PostParams::default(), &object).await?;
    let refused = status_until(&api, &name, |s| {
        condition(s, "SyncServiceReady")["reason"] == "Refused"
    })
    .await?;
    let message = condition(&refused.data["status"], "SyncServiceReady")["message"].clone();
    ensure!(
        message.as_str().unwrap_or_default().contains("selector"),
        "{message}"
    );
    event_until(
        &client,
        &s.ns,
        "ClusterEndpoint",
        &name,
        "Refused",
        "selector",
    )
    .await?;
    let after = s.api::<Service>().get(&name).await?;
    ensure!(
        after.metadata.resource_version == created.metadata.resource_version,
        "the Service was modified"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn file_and_object(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "objects-merge").await?;
    let file = |host: &Host| {
        format!(
            "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: shared, namespace: {}}}\n\
             spec:\n  periodSeconds: 1\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, hosts: [\"{}\"], tcpSocket: {{enable: true}}}}\n",
            s.ns,
            host.ip()
        )
    };
    let daemon = Daemon::start_with_objects(
        cp,
        &[("shared.yaml", file(&h1))],
        &s.ns,
        &Daemon::new_instance(),
        "",
    )?;
    let from_file = expect(&[("shared-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "shared", &from_file, WAIT).await?;
    let api = endpoints(&client, &s.ns);
    api.create(
        &PostParams::default(),
        &web_object("shared", &s.ns, &[&h2], json!({}))?,
    )
    .await?;

    // The file wins; the object says so, as do its Events and the status API.
    let lost = status_until(&api, "shared", |s| {
        condition(s, "SyncServiceReady")["reason"] == "Conflict"
    })
    .await?;
    let message = condition(&lost.data["status"], "SyncServiceReady")["message"].to_string();
    ensure!(message.contains("shared.yaml"), "{message}");
    event_until(
        &client,
        &s.ns,
        "ClusterEndpoint",
        "shared",
        "Conflict",
        "shared.yaml",
    )
    .await?;
    let problems = daemon.status().await?["problems"].to_string();
    ensure!(problems.contains("conflict"), "{problems}");
    slices_become(&s, "shared", &from_file, WAIT).await?;
    let owners = s
        .api::<Service>()
        .get("shared")
        .await?
        .metadata
        .owner_references;
    ensure!(
        owners.unwrap_or_default().is_empty(),
        "a Service a file defines has no owner"
    );

    // Removing the file hands the Service to the object; never a moment without a ready host.
    let no_ready_host = |slices: &BTreeMap<String, EndpointSlice>| ready_hosts(slices).is_empty();
    let labels = "kubernetes.io/service-name=shared";
    let guard = tokio::spawn(watch::never(
        s.api::<EndpointSlice>(),
        labels,
        Duration::from_secs(8),
        no_ready_host,
    ));
    std::fs::remove_file(daemon.definitions_dir().join("shared.yaml"))?;
    let from_object = expect(&[("shared-80-tcp-ipv4", &h2, true)]);
    slices_become(&s, "shared", &from_object, WAIT).await?;
    guard
        .await?
        .context("a moment with no ready endpoint during the handover to the object")?;
    status_until(&api, "shared", |s| s["phase"] == "Healthy").await?;
    let owners = s
        .api::<Service>()
        .get("shared")
        .await?
        .metadata
        .owner_references
        .unwrap_or_default();
    ensure!(
        owners.len() == 1,
        "the object now owns the Service: {owners:?}"
    );

    // The file comes back and wins; deleting the object then hands over, nothing is deleted.
    std::fs::write(daemon.definitions_dir().join("shared.yaml"), file(&h1))?;
    slices_become(&s, "shared", &from_file, WAIT).await?;
    let guard = tokio::spawn(watch::never(
        s.api::<EndpointSlice>(),
        labels,
        Duration::from_secs(6),
        no_ready_host,
    ));
    api.delete("shared", &DeleteParams::default()).await?;
    gone(&api, "shared").await?;
    guard
        .await?
        .context("a moment with no ready endpoint after the object was deleted")?;
    slices_become(&s, "shared", &from_file, WAIT).await?;
    ensure!(
        s.api::<Service>().get_opt("shared").await?.is_some(),
        "the Service stays for the file"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn invalid_objects(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-invalid").await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    // The schema cannot see that loopback is no endpoint address; the daemon drops that host.
    let mut partly = web_object("partly", &s.ns, &[&h1], json!({}))?;
    partly.data["spec"]["ports"][0]["hosts"] = json!([h1.ip().to_string(), "127.0.0.1"]);
    api.create(&PostParams::default(), &partly).await?;
    let mut broken = web_object("broken", &s.ns, &[&h1], json!({}))?;
    broken.data["spec"]["ports"][0]["httpGet"] = json!({"scheme": "FTP"});
    broken.data["spec"]["ports"][0]["tcpSocket"] = Value::Null;
    api.create(&PostParams::default(), &broken).await?;

    let only_good = expect(&[("partly-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "partly", &only_good, WAIT).await?;
    let partly = status_until(&api, "partly", |s| s["phase"] == "Healthy").await?;
    let init = condition(&partly.data["status"], "Initialized").clone();
    ensure!(
        init["status"] == "True" && init["reason"] == "PartlyInvalid",
        "{init:#}"
    );
    ensure!(
        init["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.ports[0].hosts[1] = \"127.0.0.1\""),
        "{init:#}"
    );

    let broken = status_until(&api, "broken", |s| {
        condition(s, "Initialized")["reason"] == "InvalidSpec"
    })
    .await?;
    let status = &broken.data["status"];
    ensure!(status["phase"] == "Pending", "{status:#}");
    let message = condition(status, "Initialized")["message"].to_string();
    ensure!(
        message.contains("spec.ports[0].httpGet.scheme") && message.contains("FTP"),
        "{message}"
    );
    event_until(
        &client,
        &s.ns,
        "ClusterEndpoint",
        "broken",
        "InvalidSpec",
        "FTP",
    )
    .await?;
    ensure!(
        s.api::<Service>().get_opt("broken").await?.is_none(),
        "nothing is applied for it"
    );
    let problems = daemon.status().await?["problems"].to_string();
    ensure!(
        problems.contains("ClusterEndpoint") && problems.contains("FTP"),
        "{problems}"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn restart(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "objects-restart").await?;
    let instance = Daemon::new_instance();
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &instance, "")?;
    let api = endpoints(&client, &s.ns);
    // Three successes to become ready: a restarted daemon could not decide on its first probe.
    let slow = json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080,
        "hosts": [h1.ip().to_string(), h2.ip().to_string()], "tcpSocket": {"enable": true},
        "successThreshold": 3, "failureThreshold": 2}]}});
    api.create(
        &PostParams::default(),
        &web_object("web", &s.ns, &[], slow)?,
    )
    .await?;
    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, WAIT).await?;
    let healthy = status_until(&api, "web", |s| s["phase"] == "Healthy").await?;
    ensure!(daemon.stop()? == Some(0));

    let version = healthy.metadata.resource_version.clone();
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &instance, "")?;
    let not_ready = |slices: &BTreeMap<String, EndpointSlice>| ready_hosts(slices).len() != 2;
    watch::never(
        s.api::<EndpointSlice>(),
        "kubernetes.io/service-name=web",
        Duration::from_secs(6),
        not_ready,
    )
    .await
    .context("a host flapped across the restart")?;
    let seen = daemon.status().await?["probes"]["probesTotal"]
        .as_u64()
        .unwrap_or_default();
    ensure!(seen >= 6, "the new daemon probed {seen} times");
    let now = api.get("web").await?;
    ensure!(
        now.metadata.resource_version == version,
        "the restart rewrote the status:\n{:#}",
        now.data["status"]
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn fan_out(a: &'static ControlPlane) -> Result<()> {
    let b = tokio::task::spawn_blocking(|| ControlPlane::start("objects-b")).await??;
    let client_a = a.client();
    install(&client_a).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(a, "objects-fanout").await?;
    let client_b = b.client();
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(s.ns.clone());
    Api::<Namespace>::all(client_b.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let second = format!(
        "[[clusters]]\nname = \"objects-b\"\nkubeconfig = \"{}\"\n",
        b.kubeconfig_path().display()
    );
    let daemon = Daemon::start_with_objects(a, &[], &s.ns, &Daemon::new_instance(), &second)?;
    let api = endpoints(&client_a, &s.ns);
    let fan = json!({"spec": {"clusters": ["objects-b"]}});
    api.create(
        &PostParams::default(),
        &web_object("web", &s.ns, &[&h1], fan)?,
    )
    .await?;
    api.create(
        &PostParams::default(),
        &web_object("local", &s.ns, &[&h1], json!({}))?,
    )
    .await?;
    let slices_b: Api<EndpointSlice> = Api::namespaced(client_b.clone(), &s.ns);
    let ready =
        |name: &str| BTreeMap::from([((format!("{name}-80-tcp-ipv4"), h1.ip().to_string()), true)]);
    slices_become(&s, "web", &ready("web"), WAIT).await?;
    watch::until(
        slices_b.clone(),
        "kubernetes.io/service-name=web",
        WAIT,
        |slices| readiness(slices) == ready("web"),
    )
    .await
    .context("the object's Service in the other cluster")?;
    let services_b: Api<Service> = Api::namespaced(client_b.clone(), &s.ns);
    let remote = services_b.get("web").await?;
    ensure!(
        remote
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "no owner across clusters"
    );
    slices_become(&s, "local", &ready("local"), WAIT).await?;
    ensure!(
        services_b.get_opt("local").await?.is_none(),
        "an object without spec.clusters stays in its own cluster"
    );

    api.delete("web", &DeleteParams::default()).await?;
    gone(&services_b, "web")
        .await
        .context("pruning in the other cluster")?;
    watch::until(slices_b, "kubernetes.io/service-name=web", WAIT, |slices| {
        slices.is_empty()
    })
    .await?;
    gone(&s.api::<Service>(), "web").await?;
    drop(daemon);
    s.cleanup().await;
    tokio::task::spawn_blocking(move || b.shutdown()).await?;
    Ok(())
}

/// An edit that leaves nothing usable, made while the daemon is down (so no earlier version is
/// known to it): the Service and its slices stay as they are, and the status says why.
async fn unusable_while_stopped(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-unusable").await?;
    let instance = Daemon::new_instance();
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &instance, "")?;
    let api = endpoints(&client, &s.ns);
    api.create(
        &PostParams::default(),
        &web_object("db", &s.ns, &[&h1], json!({}))?,
    )
    .await?;
    status_until(&api, "db", |s| s["phase"] == "Healthy").await?;
    let before = s.api::<Service>().get("db").await?.metadata.uid;
    ensure!(daemon.stop()? == Some(0));

    // A clusterIP that is no address leaves nothing to apply.
    let unusable = json!({"spec": {"clusterIP": "bogus"}});
    api.patch("db", &PatchParams::default(), &Patch::Merge(&unusable))
        .await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &instance, "")?;
    status_until(&api, "db", |s| {
        condition(s, "Initialized")["reason"] == "InvalidSpec"
    })
    .await
    .with_context(|| daemon.log_tail(10))?;
    watch::never(
        s.api::<EndpointSlice>(),
        "kubernetes.io/service-name=db",
        Duration::from_secs(5),
        |slices| ready_hosts(slices) != [h1.ip().to_string()],
    )
    .await
    .with_context(|| format!("the slices changed\n{}", daemon.log_tail(10)))?;
    let after = s.api::<Service>().get_opt("db").await?;
    ensure!(
        after.and_then(|svc| svc.metadata.uid) == before,
        "the Service was deleted or replaced\n{}",
        daemon.log_tail(10)
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

/// Someone gives a Service the daemon manages a selector: the endpoints controller owns its
/// endpoints from then on. The daemon stops writing (no fight over the Endpoints), removes its
/// slices, and reports the refusal.
async fn selector_given_later(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-selector-later").await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    api.create(
        &PostParams::default(),
        &web_object("web", &s.ns, &[&h1], json!({}))?,
    )
    .await?;
    status_until(&api, "web", |s| s["phase"] == "Healthy").await?;

    let selector = json!({"spec": {"selector": {"app": "web"}}});
    s.api::<Service>()
        .patch("web", &PatchParams::default(), &Patch::Merge(&selector))
        .await?;
    status_until(&api, "web", |s| {
        condition(s, "SyncServiceReady")["reason"] == "Refused"
    })
    .await
    .with_context(|| daemon.log_tail(10))?;
    watch::until(
        s.api::<EndpointSlice>(),
        "endpointslice.kubernetes.io/managed-by=endpoints-operator.sealos.io",
        WAIT,
        |slices| slices.is_empty(),
    )
    .await
    .context("the daemon's slices of the Service go")?;
    let conflicts = daemon.status().await?["clusters"][0]["conflicts"].clone();
    ensure!(
        conflicts.as_object().is_some_and(|c| !c.is_empty()),
        "the status API lists the conflict: {conflicts}"
    );
    // Deleting the object later must not take the Service with it.
    let owners = s
        .api::<Service>()
        .get("web")
        .await?
        .metadata
        .owner_references;
    ensure!(
        owners
            .unwrap_or_default()
            .iter()
            .all(|o| o.kind != "ClusterEndpoint"),
        "the Service given a selector still names its ClusterEndpoint as owner"
    );

    // What the endpoints controller does: the daemon leaves it alone.
    let writes = |status: Value| status["clusters"][0]["writes"].as_u64().unwrap_or_default();
    let before = writes(daemon.status().await?);
    let eps: Api<Endpoints> = s.api();
    for round in 0..3 {
        let subsets =
            json!({"metadata": {"annotations": {"round": round.to_string()}}, "subsets": []});
        eps.patch("web", &PatchParams::default(), &Patch::Merge(&subsets))
            .await?;
        watch::until(eps.clone(), "", WAIT, |e| {
            e.get("web").is_some_and(|e| {
                e.metadata.annotations.as_ref().and_then(|a| a.get("round"))
                    == Some(&round.to_string())
            })
        })
        .await?;
    }
    // The notices of those edits reach the daemon within a pass; then nothing more is written.
    watch::never(s.api::<Endpoints>(), "", Duration::from_secs(3), |e| {
        e.get("web")
            .is_some_and(|e| e.subsets.as_ref().is_some_and(|s| !s.is_empty()))
    })
    .await
    .with_context(|| {
        format!(
            "the daemon wrote the Endpoints back\n{}",
            daemon.log_tail(10)
        )
    })?;
    let after = writes(daemon.status().await?);
    ensure!(
        after == before,
        "{} writes after the selector, expected none\n{}",
        after - before,
        daemon.log_tail(10)
    );

    // The selector goes again: nothing the daemon watches tells it, yet it takes the Service back.
    let no_selector = json!({"spec": {"selector": null}});
    s.api::<Service>()
        .patch("web", &PatchParams::default(), &Patch::Merge(&no_selector))
        .await?;
    let only_h1 = expect(&[("web-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "web", &only_h1, Duration::from_secs(45))
        .await
        .with_context(|| format!("the Service is not taken back\n{}", daemon.log_tail(10)))?;
    status_until(&api, "web", |s| s["phase"] == "Healthy").await?;
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

/// `kubectl replace --force`: an object deleted and created again under the same name at once,
/// while the sink is busy with others, so it may never see the moment without it. The new
/// object is a new object: it gets a status of its own.
async fn recreated_at_once(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "objects-recreated").await?;
    let daemon = Daemon::start_with_objects(cp, &[], &s.ns, &Daemon::new_instance(), "")?;
    let api = endpoints(&client, &s.ns);
    for i in 0..20 {
        let other = web_object(&format!("other-{i}"), &s.ns, &[&h1], json!({}))?;
        api.create(&PostParams::default(), &other).await?;
    }
    let web = web_object("web", &s.ns, &[&h1], json!({}))?;
    api.create(&PostParams::default(), &web).await?;
    status_until(&api, "web", |s| s["phase"] == "Healthy").await?;
    for round in 0..5 {
        api.delete("web", &DeleteParams::default()).await?;
        let created = api.create(&PostParams::default(), &web).await?;
        let found = watch::until(api.clone(), "", WAIT, |objects| {
            objects.get("web").is_some_and(|o| {
                o.metadata.uid == created.metadata.uid && o.data["status"]["phase"] == "Healthy"
            })
        })
        .await;
        found.with_context(|| {
            format!(
                "round {round}: the new object got no status\n{}",
                daemon.log_tail(10)
            )
        })?;
    }
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

/// The original project's README example, only its hosts moved to test hosts: one serving every
/// port (TLS port as plain TCP, HTTP `/healthz` with `scheme: http` in lower case, UDP echo, gRPC
/// health), one serving nothing. As a file and as an object, each port shows the first host
/// ready and the second not.
async fn seed_wordpress_runs(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    install(&client).await?;
    let net = TestNet::new()?;
    let (up, down) = (net.add_host()?, net.add_host()?);
    let _servers = [
        up.serve_tcp(443)?,
        up.serve_http(80, |_| crate::support::HttpResponse::ok("ok"))?,
        up.serve_udp_echo(1234)?,
        up.serve_grpc_health(8080, &[("", tonic_health::ServingStatus::Serving)])?,
    ];
    let text = crate::daemon::case_file("seed-wordpress.yaml")
        .replace("10.33.40.151", &up.ip().to_string())
        .replace("10.33.40.152", &down.ip().to_string());
    let (from_file, from_object) = (
        Scratch::new(cp, "wordpress-file").await?,
        Scratch::new(cp, "wordpress-object").await?,
    );
    let file = text.replace(
        "namespace: default",
        &format!("namespace: {}", from_file.ns),
    );
    let daemon = Daemon::start_with_objects(
        cp,
        &[("wordpress.yaml", file)],
        &from_object.ns,
        &Daemon::new_instance(),
        "",
    )?;
    let mut object: DynamicObject = serde_saphyr::from_str(&text)?;
    object.metadata.namespace = Some(from_object.ns.clone());
    endpoints(&client, &from_object.ns)
        .create(&PostParams::default(), &object)
        .await?;
    let mut wanted = Vec::new();
    for slice in [
        "wordpress-38081-tcp-ipv4",
        "wordpress-38082-tcp-ipv4",
        "wordpress-38003-udp-ipv4",
        "wordpress-38083-tcp-ipv4",
    ] {
        wanted.push((slice, &up, true));
        wanted.push((slice, &down, false));
    }
    let wanted = expect(&wanted);
    for scratch in [&from_file, &from_object] {
        slices_become(scratch, "wordpress", &wanted, WAIT)
            .await
            .with_context(|| format!("in {}\n{}", scratch.ns, daemon.log_tail(10)))?;
    }
    let api = endpoints(&client, &from_object.ns);
    status_until(&api, "wordpress", |s| {
        s["phase"] == "UnHealthy" && s["readyHosts"] == "4/8"
    })
    .await?;
    drop(daemon);
    from_file.cleanup().await;
    from_object.cleanup().await;
    Ok(())
}
