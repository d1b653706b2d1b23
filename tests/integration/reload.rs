//! Definitions from files follow their files while the daemon runs: edits, new files, broken
//! files and deleted files, each taking effect within two seconds of the write.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::daemon::{Scratch, readiness};
use crate::support::daemon::Daemon;
use crate::support::{Case, ControlPlane, Host, TestNet, watch};

const OURS: &str = "app.kubernetes.io/managed-by=endpoints-operator";
/// The promise made to users, with room for the watch that observes it.
const WITHIN: Duration = Duration::from_secs(2);

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "reload::objects_of_a_definition_removed_while_stopped_are_pruned_on_start",
            pruned_on_start,
        ),
        Case::tokio(
            "reload::definitions_broken_while_stopped_keep_their_objects_on_start",
            broken_while_stopped,
        ),
        Case::tokio(
            "reload::file_edits_new_broken_and_deleted_files_take_effect_within_two_seconds",
            file_changes,
        ),
    ]
}

fn definition(name: &str, ns: &str, hosts: &[&Host]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| h.ip().to_string()).collect();
    format!(
        "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  periodSeconds: 1\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, hosts: [{}], tcpSocket: {{enable: true}}}}\n",
        hosts.join(", ")
    )
}

/// The addresses listed (ready or not) in a Service's slices.
fn listed(slices: &std::collections::BTreeMap<String, EndpointSlice>) -> Vec<String> {
    readiness(slices).keys().map(|(_, ip)| ip.clone()).collect()
}

async fn file_changes(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "reload").await?;
    let daemon = Daemon::start(cp, &[("web.yaml", definition("web", &s.ns, &[&h1]))])?;
    let web = "kubernetes.io/service-name=web";
    watch::until(
        s.api::<EndpointSlice>(),
        web,
        Duration::from_secs(30),
        |sl| listed(sl) == [h1.ip().to_string()],
    )
    .await?;
    let file = daemon.definitions_dir().join("web.yaml");

    // An edit in place adds a host.
    let written = Instant::now();
    std::fs::write(&file, definition("web", &s.ns, &[&h1, &h2]))?;
    let both = vec![h1.ip().to_string(), h2.ip().to_string()];
    watch::until(
        s.api::<EndpointSlice>(),
        web,
        WITHIN + Duration::from_secs(1),
        |sl| listed(sl) == both,
    )
    .await?;
    ensure!(
        written.elapsed() <= WITHIN,
        "the edit took {:?}",
        written.elapsed()
    );

    // A broken file keeps its last good version in force and says why.
    std::fs::write(&file, "metadata: {name: web\nspec: [")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = daemon.status().await?;
        let problems = status["problems"].to_string();
        if problems.contains("web.yaml") && problems.contains("stays in force") {
            let hosts = status["definitions"][0]["ports"][0]["hosts"]
                .as_array()
                .map(Vec::len);
            ensure!(
                hosts == Some(2),
                "the last good version is still probed: {status}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no problem reported for the broken file: {problems}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slices = s
        .api::<EndpointSlice>()
        .list(&kube::api::ListParams::default().labels(web))
        .await?;
    ensure!(
        listed(
            &slices
                .items
                .into_iter()
                .map(|x| (x.metadata.name.clone().unwrap_or_default(), x))
                .collect()
        ) == both
    );

    // Fixed by replacing the file (as editors and sync tools do): h1 goes away.
    let written = Instant::now();
    let temporary = daemon.definitions_dir().join(".web.yaml.tmp");
    std::fs::write(&temporary, definition("web", &s.ns, &[&h2]))?;
    std::fs::rename(&temporary, &file)?;
    watch::until(
        s.api::<EndpointSlice>(),
        web,
        WITHIN + Duration::from_secs(1),
        |sl| listed(sl) == [h2.ip().to_string()],
    )
    .await?;
    ensure!(
        written.elapsed() <= WITHIN,
        "the fix took {:?}",
        written.elapsed()
    );

    // A new file adds a definition; deleting a file removes its objects.
    let written = Instant::now();
    std::fs::write(
        daemon.definitions_dir().join("api.yaml"),
        definition("api", &s.ns, &[&h1]),
    )?;
    watch::until(
        s.api::<Service>(),
        OURS,
        WITHIN + Duration::from_secs(1),
        |svcs| svcs.contains_key("api"),
    )
    .await?;
    ensure!(
        written.elapsed() <= WITHIN,
        "the new file took {:?}",
        written.elapsed()
    );
    let removed = Instant::now();
    std::fs::remove_file(&file)?;
    watch::until(
        s.api::<Service>(),
        OURS,
        WITHIN + Duration::from_secs(1),
        |svcs| !svcs.contains_key("web"),
    )
    .await
    .context("the Service of the deleted file goes away")?;
    watch::until(
        s.api::<EndpointSlice>(),
        web,
        Duration::from_secs(2),
        |sl| sl.is_empty(),
    )
    .await?;
    ensure!(
        removed.elapsed() <= WITHIN + Duration::from_secs(1),
        "the removal took {:?}",
        removed.elapsed()
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn pruned_on_start(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "prune").await?;
    let daemon = Daemon::start_as(
        cp,
        &[("gone.yaml", definition("gone", &s.ns, &[&h1]))],
        &s.ns,
    )?;
    watch::until(
        s.api::<EndpointSlice>(),
        "kubernetes.io/service-name=gone",
        Duration::from_secs(30),
        |sl| listed(sl) == [h1.ip().to_string()],
    )
    .await?;
    daemon.stop()?;

    // Another daemon instance's object, and one nobody labelled: neither is ours to delete.
    let mut foreign = Service::default();
    foreign.metadata.name = Some("foreign".into());
    foreign.metadata.labels = Some(
        [
            ("app.kubernetes.io/managed-by", "endpoints-operator"),
            ("endpoints-operator.sealos.io/instance", "other"),
            ("endpoints-operator.sealos.io/source", "file"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    foreign.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
        ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
            port: 80,
            ..Default::default()
        }]),
        ..Default::default()
    });
    s.api::<Service>()
        .create(&Default::default(), &foreign)
        .await?;

    // The definition is gone while the daemon was down: its objects go on the next start.
    let daemon = Daemon::start_as(cp, &[], &s.ns)?;
    watch::until(s.api::<Service>(), OURS, Duration::from_secs(15), |svcs| {
        !svcs.contains_key("gone")
    })
    .await
    .context("the orphaned Service is pruned")?;
    watch::until(
        s.api::<EndpointSlice>(),
        "kubernetes.io/service-name=gone",
        Duration::from_secs(10),
        |sl| sl.is_empty(),
    )
    .await
    .context("its slices are pruned")?;
    ensure!(
        s.api::<Service>().get_opt("foreign").await?.is_some(),
        "another instance's Service is kept"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

/// Bad input never takes away what is applied, also across a restart, when no earlier version
/// of the file is known: a definition that is there but unusable keeps its objects, and while a
/// file cannot be parsed at all (it may define anything) nothing is pruned.
async fn broken_while_stopped(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "broken").await?;
    let instance = Daemon::new_instance();
    let names = ["one", "two", "three"];
    let files: Vec<(String, String)> = (names.iter())
        .map(|n| (format!("{n}.yaml"), definition(n, &s.ns, &[&h1])))
        .collect();
    let files: Vec<(&str, String)> = files.iter().map(|(f, t)| (f.as_str(), t.clone())).collect();
    let daemon = Daemon::start_as(cp, &files, &instance)?;
    watch::until(
        s.api::<EndpointSlice>(),
        "",
        Duration::from_secs(30),
        |sl| {
            sl.len() == 3
                && sl
                    .values()
                    .all(|sl| sl.endpoints.as_ref().is_some_and(|e| !e.is_empty()))
        },
    )
    .await?;
    ensure!(daemon.stop()? == Some(0));

    // While stopped: one.yaml no longer parses, two.yaml is wholly invalid, three.yaml is gone.
    let broken = format!("metadata: {{name: one, namespace: {}\nspec: [", s.ns);
    let invalid =
        definition("two", &s.ns, &[&h1]).replace("spec:\n", "spec:\n  clusterIP: bogus\n");
    let daemon = Daemon::start_as(
        cp,
        &[("one.yaml", broken), ("two.yaml", invalid)],
        &instance,
    )?;
    let problems = daemon.status().await?["problems"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        problems >= 2,
        "both files are reported\n{}",
        daemon.log_tail(10)
    );
    watch::never(s.api::<Service>(), OURS, Duration::from_secs(5), |svcs| {
        names.iter().any(|n| !svcs.contains_key(*n))
    })
    .await
    .with_context(|| format!("a Service was pruned\n{}", daemon.log_tail(10)))?;

    // Once one.yaml parses again, the Service of the deleted file goes; two's stays.
    std::fs::write(
        daemon.definitions_dir().join("one.yaml"),
        definition("one", &s.ns, &[&h1]),
    )?;
    watch::until(s.api::<Service>(), OURS, Duration::from_secs(15), |svcs| {
        !svcs.contains_key("three")
    })
    .await
    .context("the deleted file's Service is pruned once every file parses")?;
    let left: Vec<String> = s
        .api::<Service>()
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|svc| svc.metadata.name.clone().unwrap_or_default())
        .collect();
    ensure!(left == ["one", "two"], "Services left: {left:?}");
    drop(daemon);
    s.cleanup().await;
    Ok(())
}
