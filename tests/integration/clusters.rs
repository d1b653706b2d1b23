//! One daemon, two real clusters: each host probed once and published to both, a definition's
//! `clusters` list honoured, and one API server going away never holding up the other.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::daemon::{expect, readiness};
use crate::support::daemon::{Daemon, free_port};
use crate::support::{Case, ControlPlane, Host, TestNet, watch};

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "clusters::clusters_added_to_or_removed_from_the_config_apply_without_a_restart",
            config_reload,
        ),
        Case::tokio(
            "clusters::fan_out_to_two_clusters_survives_one_api_server_going_away",
            fan_out,
        ),
    ]
}

async fn namespace(client: &Client, name: &str) -> Result<()> {
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.into());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

fn definition(name: &str, ns: &str, hosts: &[&Host], clusters: Option<&str>) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| h.ip().to_string()).collect();
    let clusters = clusters
        .map(|c| format!("  clusters: [{c}]\n"))
        .unwrap_or_default();
    format!(
        "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{clusters}  periodSeconds: 1\n  ports:\n    - \
         {{name: http, port: 80, targetPort: 8080, hosts: [{}], tcpSocket: {{enable: true}}, failureThreshold: 2}}\n",
        hosts.join(", ")
    )
}

async fn slices_in(
    client: &Client,
    ns: &str,
    service: &str,
    wanted: &BTreeMap<(String, String), bool>,
    timeout: Duration,
) -> Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    watch::until(
        api,
        &format!("kubernetes.io/service-name={service}"),
        timeout,
        |s| readiness(s) == *wanted,
    )
    .await
    .map(|_| ())
}

async fn fan_out(a: &'static ControlPlane) -> Result<()> {
    // The shared cluster is "test"; this trial brings its own second one, which it may stop.
    let b = tokio::task::spawn_blocking(|| ControlPlane::start("second")).await??;
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let mut server1 = Some(h1.serve_tcp(8080)?);
    let _server2 = h2.serve_tcp(8080)?;
    let ns = format!("fanout-{}", std::process::id());
    let (client_a, client_b) = (a.client(), b.client());
    namespace(&client_a, &ns).await?;
    namespace(&client_b, &ns).await?;
    let files = [
        ("web.yaml", definition("web", &ns, &[&h1, &h2], None)),
        (
            "only-b.yaml",
            definition("only-b", &ns, &[&h2], Some("second")),
        ),
    ];
    let second = format!(
        "[[clusters]]\nname = \"second\"\nkubeconfig = \"{}\"\n",
        b.kubeconfig_path().display()
    );
    let daemon = Daemon::start_with_config(a, &files, free_port()?, &second)?;

    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_in(&client_a, &ns, "web", &both, Duration::from_secs(30))
        .await
        .context("cluster test")?;
    slices_in(&client_b, &ns, "web", &both, Duration::from_secs(30))
        .await
        .context("cluster second")?;
    let only_b = expect(&[("only-b-80-tcp-ipv4", &h2, true)]);
    slices_in(&client_b, &ns, "only-b", &only_b, Duration::from_secs(10)).await?;
    ensure!(
        Api::<Service>::namespaced(client_a.clone(), &ns)
            .get_opt("only-b")
            .await?
            .is_none(),
        "a definition for cluster second only is not in cluster test"
    );

    // Each host is probed once per period, however many clusters receive it.
    let hits = server1.as_ref().context("server")?.hits();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let probed = server1.as_ref().context("server")?.hits() - hits;
    ensure!(
        (4..=6).contains(&probed),
        "{probed} probes of h1 in 5 s at period 1 s"
    );

    // Cluster second's API server goes away; cluster test still follows h1 dying in time.
    b.stop_apiserver();
    let killed = Instant::now();
    server1.take().context("server")?.stop();
    let down = expect(&[
        ("web-80-tcp-ipv4", &h1, false),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_in(&client_a, &ns, "web", &down, Duration::from_secs(10)).await?;
    let detected = killed.elapsed().as_secs_f64();
    // failureThreshold·period + timeout + 1 s, as for a single cluster.
    ensure!(
        detected <= 2.0 + 1.0 + 1.0,
        "detected after {detected:.2}s with the other cluster down"
    );

    // It comes back and is brought up to date.
    let b = tokio::task::spawn_blocking(move || b.start_apiserver().map(|()| b)).await??;
    let back = Instant::now();
    slices_in(&client_b, &ns, "web", &down, Duration::from_secs(20))
        .await
        .context("catching up")?;
    eprintln!(
        "cluster second caught up {:.2}s after its API server returned",
        back.elapsed().as_secs_f64()
    );
    let status = daemon.status().await?;
    let second = status["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "second")
        .cloned();
    ensure!(
        second.as_ref().is_some_and(|c| c["connected"] == true),
        "cluster second reported connected: {second:?}"
    );

    // Cluster second leaves the definition's `clusters` list: its objects go from there only.
    let web = definition("web", &ns, &[&h1, &h2], Some("test"));
    std::fs::write(daemon.definitions_dir().join("web.yaml"), web)?;
    let ours = "app.kubernetes.io/managed-by=endpoints-operator";
    watch::until(
        Api::<Service>::namespaced(client_b.clone(), &ns),
        ours,
        Duration::from_secs(5),
        |svcs| !svcs.contains_key("web"),
    )
    .await
    .context("web leaves cluster second")?;
    ensure!(
        Api::<Service>::namespaced(client_a.clone(), &ns)
            .get_opt("web")
            .await?
            .is_some(),
        "web stays in cluster test"
    );
    drop(daemon);
    tokio::task::spawn_blocking(move || b.shutdown()).await?;
    let _ = Api::<Namespace>::all(client_a)
        .delete(&ns, &Default::default())
        .await;
    Ok(())
}

async fn config_reload(a: &'static ControlPlane) -> Result<()> {
    let c = tokio::task::spawn_blocking(|| ControlPlane::start("third")).await??;
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let ns = format!("cfgreload-{}", std::process::id());
    let (client_a, client_c) = (a.client(), c.client());
    namespace(&client_a, &ns).await?;
    namespace(&client_c, &ns).await?;
    let daemon = Daemon::start(a, &[("web.yaml", definition("web", &ns, &[&h1], None))])?;
    let ready = expect(&[("web-80-tcp-ipv4", &h1, true)]);
    slices_in(&client_a, &ns, "web", &ready, Duration::from_secs(30)).await?;

    // A cluster added to the config file is served without a restart.
    let config = daemon.dir().join("config.toml");
    let original = std::fs::read_to_string(&config)?;
    let third = format!(
        "[[clusters]]\nname = \"third\"\nkubeconfig = \"{}\"\n",
        c.kubeconfig_path().display()
    );
    std::fs::write(&config, format!("{original}{third}"))?;
    slices_in(&client_c, &ns, "web", &ready, Duration::from_secs(10))
        .await
        .context("the added cluster gets the objects")?;

    // A broken config keeps the running one and says so.
    std::fs::write(&config, "[[clusters]\nname = ")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.status().await?;
        if status["problems"]
            .to_string()
            .contains("running configuration stays in force")
        {
            ensure!(
                status["clusters"].as_array().map(Vec::len) == Some(2),
                "both clusters still served: {status}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no problem reported for the broken config"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Taken out again: the daemon stops writing there (and leaves its objects).
    std::fs::write(&config, &original)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = daemon.status().await?;
        let names: Vec<String> = status["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect();
        if names == ["test"] && !status["problems"].to_string().contains("config.toml") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "cluster third still served: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        Api::<Service>::namespaced(client_c, &ns)
            .get_opt("web")
            .await?
            .is_some(),
        "objects stay in a removed cluster"
    );
    drop(daemon);
    tokio::task::spawn_blocking(move || c.shutdown()).await?;
    let _ = Api::<Namespace>::all(client_a)
        .delete(&ns, &Default::default())
        .await;
    Ok(())
}
