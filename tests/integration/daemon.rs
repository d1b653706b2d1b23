//! The daemon end to end on the real control plane: definitions from files, real servers on test
//! hosts, and what a workload's cluster then sees in its Service, EndpointSlices and Endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

use crate::support::daemon::{Daemon, run_cli};
use crate::support::{Case, ControlPlane, Host, HttpResponse, Server, TestNet, watch};

const OURS: &str = "app.kubernetes.io/managed-by=endpoints-operator";

pub fn cases() -> Vec<Case> {
    let mut cases = vec![
        Case::tokio(
            "daemon::healthy_hosts_are_ready_everywhere_and_nothing_is_written_at_rest",
            healthy_hosts_at_rest,
        ),
        Case::tokio(
            "daemon::case_one_bad_host_applies_the_valid_hosts_and_reports_each_invalid_one",
            one_bad_host,
        ),
        Case::tokio(
            "daemon::case_per_port_health_keeps_a_host_ready_on_its_healthy_port",
            per_port_health,
        ),
        Case::tokio(
            "daemon::case_http_without_scheme_defaults_to_http",
            http_without_scheme,
        ),
        Case::tokio(
            "daemon::case_selector_service_is_left_untouched_and_reported",
            selector_service,
        ),
        Case::blocking("daemon::case_seed_wordpress_passes_check_unchanged", |_| {
            seed_wordpress_check()
        }),
        Case::blocking(
            "daemon::check_lists_every_problem_with_file_field_and_value",
            |_| check_reports_problems(),
        ),
    ];
    cases.push(Case::tokio(
        "daemon::objects_deleted_or_edited_by_others_are_restored",
        drift_is_repaired,
    ));
    cases.push(Case::tokio(
        "daemon::a_service_given_a_selector_is_never_deleted_with_its_definition",
        selector_service_outlives_definition,
    ));
    cases.push(Case::tokio(
        "daemon::a_service_of_another_instance_is_left_alone_and_reported",
        other_instance,
    ));
    cases.push(Case::tokio(
        "daemon::a_restart_keeps_objects_and_never_flaps_ready_hosts",
        restart_without_flap,
    ));
    for kill in [Kill::ClosePort, Kill::DropPackets, Kill::LinkDown] {
        cases.push(Case::tokio(
            format!(
                "daemon::a_host_killed_by_{}_goes_not_ready_in_time_and_recovers",
                kill.name()
            ),
            move |cp| kill_and_revive(cp, kill),
        ));
    }
    cases
}

pub fn case_file(name: &str) -> String {
    let path = format!("{}/tests/cases/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fresh namespace per test; deleted (with everything in it) when the test ends.
pub struct Scratch {
    client: Client,
    pub ns: String,
}

impl Scratch {
    pub async fn new(cp: &ControlPlane, prefix: &str) -> Result<Scratch> {
        let client = cp.client();
        let ns = format!("{prefix}-{}", std::process::id() % 100_000 + rand_suffix());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let mut object = Namespace::default();
        object.metadata.name = Some(ns.clone());
        namespaces.create(&PostParams::default(), &object).await?;
        Ok(Scratch { client, ns })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Puts a case file into this namespace and onto these test hosts (10.240.0.N → hosts[N-2]).
    pub fn localize(&self, text: &str, hosts: &[&Host]) -> String {
        let mut text = text.replace("namespace: default", &format!("namespace: {}", self.ns));
        for (i, host) in hosts.iter().enumerate() {
            text = text.replace(&format!("10.240.0.{}", i + 2), &host.ip().to_string());
        }
        text
    }

    pub async fn cleanup(self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// (slice, address) → ready, across every slice of a Service.
pub fn readiness(slices: &BTreeMap<String, EndpointSlice>) -> BTreeMap<(String, String), bool> {
    let mut out = BTreeMap::new();
    for (name, slice) in slices {
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(false);
            out.insert((name.clone(), endpoint.addresses.join(",")), ready);
        }
    }
    out
}

pub fn expect(pairs: &[(&str, &Host, bool)]) -> BTreeMap<(String, String), bool> {
    pairs
        .iter()
        .map(|(slice, host, ready)| ((slice.to_string(), host.ip().to_string()), *ready))
        .collect()
}

/// Waits until the Service's slices show exactly `wanted`.
pub async fn slices_become(
    s: &Scratch,
    service: &str,
    wanted: &BTreeMap<(String, String), bool>,
    timeout: Duration,
) -> Result<BTreeMap<String, EndpointSlice>> {
    let labels = format!("kubernetes.io/service-name={service}");
    watch::until(s.api::<EndpointSlice>(), &labels, timeout, |slices| {
        readiness(slices) == *wanted
    })
    .await
    .with_context(|| format!("waiting for {service} slices to become {wanted:?}"))
}

fn endpoints_split(e: &Endpoints) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut ready = BTreeSet::new();
    let mut not_ready = BTreeSet::new();
    for subset in e.subsets.iter().flatten() {
        let port = subset
            .ports
            .iter()
            .flatten()
            .map(|p| p.port)
            .next()
            .unwrap_or_default();
        ready.extend(
            subset
                .addresses
                .iter()
                .flatten()
                .map(|a| format!("{}:{port}", a.ip)),
        );
        not_ready.extend(
            subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| format!("{}:{port}", a.ip)),
        );
    }
    (ready, not_ready)
}

fn web_definition(ns: &str, hosts: &[&Host]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{}\"", h.ip())).collect();
    format!(
        "apiVersion: sealos.io/v1beta1
kind: ClusterEndpoint
metadata:
  name: web
  namespace: {ns}
spec:
  periodSeconds: 1
  ports:
    - name: http
      port: 80
      targetPort: 8080
      hosts: [{}]
      tcpSocket: {{enable: true}}
      timeoutSeconds: 1
      failureThreshold: 2
      successThreshold: 3
",
        hosts.join(", ")
    )
}

async fn healthy_hosts_at_rest(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "rest").await?;
    let daemon = Daemon::start(cp, &[("web.yaml", web_definition(&s.ns, &[&h1, &h2]))])?;

    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, Duration::from_secs(30)).await?;
    let endpoints = watch::until(s.api::<Endpoints>(), OURS, Duration::from_secs(10), |e| {
        e.get("web")
            .is_some_and(|e| endpoints_split(e).0.len() == 2)
    })
    .await?;
    let (ready, not_ready) = endpoints_split(&endpoints["web"]);
    ensure!(
        ready == BTreeSet::from([format!("{}:8080", h1.ip()), format!("{}:8080", h2.ip())])
            && not_ready.is_empty()
    );
    let labels = endpoints["web"].metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels
            .get("endpointslice.kubernetes.io/skip-mirror")
            .map(String::as_str)
            == Some("true")
    );

    let service = s.api::<Service>().get("web").await?;
    let spec = service.spec.clone().unwrap_or_default();
    ensure!(
        spec.selector.is_none(),
        "the Service must have no selector: {spec:?}"
    );
    ensure!(
        spec.cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.starts_with("10.96.")),
        "a ClusterIP was allocated: {spec:?}"
    );
    let ports: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone(),
                p.port,
                p.target_port.clone(),
                p.protocol.clone(),
            )
        })
        .collect();
    ensure!(
        ports
            == [(
                Some("http".into()),
                80,
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080)),
                Some("TCP".into())
            )],
        "ports: {ports:?}"
    );

    // At rest: several periods of probing (the servers count the connections) and no writes.
    let versions = resource_versions(&s).await?;
    let writes_before = writes(&daemon).await?;
    let hits_before: u64 = servers.iter().map(Server::hits).sum();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hits_after: u64 = servers.iter().map(Server::hits).sum();
    ensure!(
        hits_after >= hits_before + 8,
        "probes kept running: {hits_before} → {hits_after}"
    );
    ensure!(
        resource_versions(&s).await? == versions,
        "objects were rewritten at rest"
    );
    ensure!(
        writes(&daemon).await? == writes_before,
        "the daemon made API writes at rest"
    );

    // With the mirroring controller running, our Endpoints produce no second set of slices.
    let all = s.api::<EndpointSlice>().list(&Default::default()).await?;
    let foreign: Vec<_> = all
        .iter()
        .filter(|e| {
            e.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
                .map(String::as_str)
                != Some("endpoints-operator.sealos.io")
        })
        .collect();
    ensure!(foreign.is_empty(), "unexpected slices: {foreign:?}");
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn resource_versions(s: &Scratch) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let rv = |kind: &str, m: &kube::api::ObjectMeta| {
        (
            format!("{kind}/{}", m.name.clone().unwrap_or_default()),
            m.resource_version.clone().unwrap_or_default(),
        )
    };
    for o in s.api::<Service>().list(&Default::default()).await? {
        out.extend([rv("Service", &o.metadata)]);
    }
    for o in s.api::<Endpoints>().list(&Default::default()).await? {
        out.extend([rv("Endpoints", &o.metadata)]);
    }
    for o in s.api::<EndpointSlice>().list(&Default::default()).await? {
        out.extend([rv("EndpointSlice", &o.metadata)]);
    }
    ensure!(
        out.len() >= 3,
        "expected Service, Endpoints and a slice: {out:?}"
    );
    Ok(out)
}

/// Polls the daemon's status API (it has no watch) until `done` holds for this host's entry.
pub async fn host_status_until(
    daemon: &Daemon,
    host: &Host,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = daemon.status().await?;
        let entry = status["definitions"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|d| d["ports"].as_array().into_iter().flatten())
            .flat_map(|p| p["hosts"].as_array().into_iter().flatten())
            .find(|h| h["host"] == host.ip().to_string())
            .cloned()
            .unwrap_or_default();
        if done(&entry) {
            return Ok(entry);
        }
        ensure!(
            Instant::now() < deadline,
            "host {} never reached the expected state: {entry}",
            host.ip()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn writes(daemon: &Daemon) -> Result<u64> {
    let status = daemon.status().await?;
    status["clusters"][0]["writes"]
        .as_u64()
        .context("clusters[0].writes in the status API")
}

#[derive(Clone, Copy)]
enum Kill {
    ClosePort,
    DropPackets,
    LinkDown,
}

impl Kill {
    fn name(self) -> &'static str {
        match self {
            Kill::ClosePort => "closing_its_port",
            Kill::DropPackets => "dropping_its_packets",
            Kill::LinkDown => "taking_its_link_down",
        }
    }
}

async fn kill_and_revive(cp: &'static ControlPlane, kill: Kill) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let mut server1 = Some(h1.serve_tcp(8080)?);
    let _server2 = h2.serve_tcp(8080)?;
    let s = Scratch::new(cp, "kill").await?;
    let daemon = Daemon::start(cp, &[("web.yaml", web_definition(&s.ns, &[&h1, &h2]))])?;
    let (period, timeout, failure_threshold, success_threshold) = (1.0, 1.0, 2.0, 3.0);

    slices_become(
        &s,
        "web",
        &expect(&[
            ("web-80-tcp-ipv4", &h1, true),
            ("web-80-tcp-ipv4", &h2, true),
        ]),
        Duration::from_secs(30),
    )
    .await?;

    let killed = Instant::now();
    match kill {
        Kill::ClosePort => server1.take().expect("server").stop(),
        Kill::DropPackets => h1.drop_packets()?,
        Kill::LinkDown => h1.link_down()?,
    }
    let down = expect(&[
        ("web-80-tcp-ipv4", &h1, false),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &down, Duration::from_secs(15)).await?;
    let detected = killed.elapsed().as_secs_f64();
    // The kubelet bound is (F−1)·period + timeout from the first failing probe; that probe comes
    // at most one period after the kill, and 1 s covers the apply and the watch.
    let bound = failure_threshold * period + timeout + 1.0;
    ensure!(
        detected <= bound,
        "not ready after {detected:.2}s, bound {bound:.2}s\n{}",
        daemon.log_tail(20)
    );

    let endpoints = s.api::<Endpoints>().get("web").await?;
    let (ready, not_ready) = endpoints_split(&endpoints);
    ensure!(
        ready == BTreeSet::from([format!("{}:8080", h2.ip())]),
        "ready: {ready:?}"
    );
    ensure!(
        not_ready == BTreeSet::from([format!("{}:8080", h1.ip())]),
        "not ready: {not_ready:?}"
    );
    let host = host_status_until(&daemon, &h1, Duration::ZERO, |h| h["ready"] == false).await?;
    ensure!(
        host["readiness"] == "notReady" && host["lastError"].is_string(),
        "status of the killed host: {host}"
    );

    let revived = Instant::now();
    match kill {
        Kill::ClosePort => server1 = Some(h1.serve_tcp(8080)?),
        Kill::DropPackets => h1.restore_packets()?,
        Kill::LinkDown => h1.link_up()?,
    }
    slices_become(
        &s,
        "web",
        &expect(&[
            ("web-80-tcp-ipv4", &h1, true),
            ("web-80-tcp-ipv4", &h2, true),
        ]),
        Duration::from_secs(15),
    )
    .await?;
    let recovered = revived.elapsed().as_secs_f64();
    // successThreshold successes in consecutive periods: never sooner than (S−1) periods after
    // the first success. With dropped packets, a probe already waiting on a SYN retransmit can be
    // that first success, so it may have started up to one timeout before the repair.
    let in_flight = if matches!(kill, Kill::DropPackets) {
        timeout
    } else {
        0.0
    };
    let earliest = (success_threshold - 1.0) * period - in_flight - 0.05;
    ensure!(
        recovered >= earliest,
        "ready again after only {recovered:.2}s (earliest {earliest:.2}s)"
    );
    ensure!(
        recovered <= (success_threshold + 1.0) * period + timeout + 1.0,
        "ready again only after {recovered:.2}s"
    );
    drop(server1);
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn one_bad_host(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(5432)?, h2.serve_tcp(5432)?];
    let s = Scratch::new(cp, "badhost").await?;
    let daemon = Daemon::start(
        cp,
        &[(
            "case.yaml",
            s.localize(&case_file("one-bad-host.yaml"), &[&h1, &h2]),
        )],
    )?;

    let wanted = expect(&[
        ("one-bad-host-5432-tcp-ipv4", &h1, true),
        ("one-bad-host-5432-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "one-bad-host", &wanted, Duration::from_secs(30)).await?;

    let status = daemon.status().await?;
    let problems: Vec<(String, String)> = status["problems"]
        .as_array()
        .context("problems")?
        .iter()
        .map(|p| {
            (
                p["field"].as_str().unwrap_or_default().to_string(),
                p["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("spec.ports[0].hosts[1]", "127.0.0.1"),
        ("spec.ports[0].hosts[2]", "db-replica.internal"),
        ("spec.ports[0].hosts[3]", "169.254.10.10"),
    ]
    .iter()
    .map(|(f, v)| (f.to_string(), v.to_string()))
    .collect();
    ensure!(problems == expected, "problems: {problems:?}");
    // Invalid entries are never targets: only the two real hosts are probed or listed.
    let hosts: Vec<&str> = status["definitions"][0]["ports"][0]["hosts"]
        .as_array()
        .context("hosts")?
        .iter()
        .filter_map(|h| h["host"].as_str())
        .collect();
    ensure!(
        hosts == [h1.ip().to_string(), h2.ip().to_string()],
        "hosts: {hosts:?}"
    );
    ensure!(
        daemon.log_tail(200).contains("db-replica.internal"),
        "the log names the invalid host"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn per_port_health(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    // Nothing listens on h2:9090.
    let _servers = [
        h1.serve_tcp(8080)?,
        h2.serve_tcp(8080)?,
        h1.serve_tcp(9090)?,
    ];
    let s = Scratch::new(cp, "perport").await?;
    let daemon = Daemon::start(
        cp,
        &[(
            "case.yaml",
            s.localize(&case_file("per-port-health.yaml"), &[&h1, &h2]),
        )],
    )?;
    let wanted = expect(&[
        ("per-port-80-tcp-ipv4", &h1, true),
        ("per-port-80-tcp-ipv4", &h2, true),
        ("per-port-9090-tcp-ipv4", &h1, true),
        ("per-port-9090-tcp-ipv4", &h2, false),
    ]);
    let slices = slices_become(&s, "per-port", &wanted, Duration::from_secs(30)).await?;
    let admin_port = slices["per-port-9090-tcp-ipv4"]
        .ports
        .iter()
        .flatten()
        .map(|p| p.port)
        .collect::<Vec<_>>();
    ensure!(
        admin_port == [Some(9090)],
        "admin slice ports: {admin_port:?}"
    );
    let (ready, not_ready) = endpoints_split(&s.api::<Endpoints>().get("per-port").await?);
    ensure!(
        ready.contains(&format!("{}:8080", h2.ip()))
            && not_ready == BTreeSet::from([format!("{}:9090", h2.ip())]),
        "{ready:?} {not_ready:?}"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn http_without_scheme(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2, h3) = (net.add_host()?, net.add_host()?, net.add_host()?);
    let ok = h1.serve_http(8080, |r| {
        if r.path == "/healthz" {
            HttpResponse::ok("ok")
        } else {
            HttpResponse::new(404)
        }
    })?;
    // A redirect to another host counts as success and is not followed (nothing listens there).
    let elsewhere = format!("http://{}:9/login", net.gateway());
    let _redirect = h2.serve_http(8080, move |_| {
        HttpResponse::new(302).header("Location", elsewhere.clone())
    })?;
    let _broken = h3.serve_http(8080, |_| HttpResponse::new(500))?;
    let s = Scratch::new(cp, "http").await?;
    let daemon = Daemon::start(
        cp,
        &[(
            "case.yaml",
            s.localize(&case_file("http-without-scheme.yaml"), &[&h1, &h2, &h3]),
        )],
    )?;
    let wanted = expect(&[
        ("http-no-scheme-8080-tcp-ipv4", &h1, true),
        ("http-no-scheme-8080-tcp-ipv4", &h2, true),
        ("http-no-scheme-8080-tcp-ipv4", &h3, false),
    ]);
    slices_become(&s, "http-no-scheme", &wanted, Duration::from_secs(30)).await?;
    ensure!(ok.hits() > 0, "the healthy host was really asked");
    // Not ready in a slice also covers "not probed yet": the status API tells them apart.
    let h3_status = host_status_until(&daemon, &h3, Duration::from_secs(10), |h| {
        h["readiness"] == "notReady"
    })
    .await?;
    let error = h3_status["lastError"].as_str().unwrap_or_default();
    ensure!(
        error.contains("500"),
        "the failing host's error names the status: {h3_status}"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn selector_service(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "selector").await?;
    let text = s.localize(&case_file("selector-service.yaml"), &[&h1]);
    let mut docs = text.split("\n---\n");
    let service: Service = serde_saphyr::from_str(docs.next().context("service document")?)?;
    let definition = docs.next().context("definition document")?.to_string();
    let created = s
        .api::<Service>()
        .create(&PostParams::default(), &service)
        .await?;

    let daemon = Daemon::start(cp, &[("payments.yaml", definition)])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let conflict = loop {
        let status = daemon.status().await?;
        if let Some(reason) = status["clusters"][0]["conflicts"]
            .as_object()
            .and_then(|c| c.values().next().cloned())
        {
            break reason;
        }
        ensure!(
            Instant::now() < deadline,
            "no conflict reported\n{}",
            daemon.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        conflict.as_str().unwrap_or_default().contains("selector"),
        "conflict: {conflict}"
    );
    let after = s.api::<Service>().get("payments").await?;
    ensure!(
        after.metadata.resource_version == created.metadata.resource_version,
        "the Service was modified"
    );
    let ours = s
        .api::<EndpointSlice>()
        .list(&kube::api::ListParams::default().labels(OURS))
        .await?;
    ensure!(
        ours.items.is_empty(),
        "no slices of ours for a selector Service"
    );
    ensure!(
        s.api::<Endpoints>()
            .list(&kube::api::ListParams::default().labels(OURS))
            .await?
            .items
            .is_empty()
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

fn seed_wordpress_check() -> Result<()> {
    let path = format!(
        "{}/tests/cases/seed-wordpress.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let (code, stdout, stderr) = run_cli(&["check", &path])?;
    ensure!(code == 0, "check failed: {stdout}{stderr}");
    ensure!(
        stdout.contains("1 definition(s), 4 port(s), 8 host(s), 0 problem(s)"),
        "{stdout}"
    );
    Ok(())
}

fn check_reports_problems() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("bad-host.yaml"),
        case_file("one-bad-host.yaml"),
    )?;
    std::fs::write(
        dir.path().join("broken.yaml"),
        "metadata: {name: x}\nspec:\n  ports:\n    - port: eighty\n",
    )?;
    let (code, _, stderr) = run_cli(&["check", &dir.path().display().to_string()])?;
    ensure!(code == 1, "exit {code}");
    for needle in [
        "bad-host.yaml: spec.ports[0].hosts[1] = \"127.0.0.1\"",
        "\"db-replica.internal\"",
        "\"169.254.10.10\"",
        "broken.yaml",
        "line 4",
    ] {
        ensure!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }

    // Objects as the only source: no definition files is fine then (not without objects).
    let setup = tempfile::tempdir()?;
    std::fs::create_dir(setup.path().join("endpoints.d"))?;
    std::fs::write(
        setup.path().join("kubeconfig"),
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n\
         clusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: x, context: {cluster: c, user: u}}]\n",
    )?;
    for (crd, want) in [(true, 0), (false, 1)] {
        let config = setup.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[sources]\npaths = [\"endpoints.d\"]\ncrd = {crd}\n\
                 [[clusters]]\nname = \"east\"\nkubeconfig = \"kubeconfig\"\n"
            ),
        )?;
        let (code, _, stderr) = run_cli(&["check", "--config", &config.display().to_string()])?;
        ensure!(code == want, "crd = {crd}: exit {code}\n{stderr}");
    }
    Ok(())
}

async fn drift_is_repaired(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "drift").await?;
    let daemon = Daemon::start(cp, &[("web.yaml", web_definition(&s.ns, &[&h1, &h2]))])?;
    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, Duration::from_secs(30)).await?;

    s.api::<EndpointSlice>()
        .delete("web-80-tcp-ipv4", &DeleteParams::default())
        .await?;
    slices_become(&s, "web", &both, Duration::from_secs(10))
        .await
        .context("the deleted slice comes back")?;

    let before = s.api::<Service>().get("web").await?.metadata.uid;
    s.api::<Service>()
        .delete("web", &DeleteParams::default())
        .await?;
    let services = watch::until(s.api::<Service>(), OURS, Duration::from_secs(10), |svcs| {
        svcs.get("web")
            .is_some_and(|svc| svc.metadata.uid != before)
    })
    .await
    .context("the deleted Service comes back")?;
    ensure!(
        services["web"]
            .spec
            .as_ref()
            .is_some_and(|s| s.selector.is_none())
    );

    // Another writer empties the Endpoints: the daemon puts its addresses back.
    let patch = serde_json::json!({"subsets": null});
    s.api::<Endpoints>()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    watch::until(s.api::<Endpoints>(), OURS, Duration::from_secs(10), |e| {
        e.get("web")
            .is_some_and(|e| endpoints_split(e).0.len() == 2)
    })
    .await
    .context("the emptied Endpoints are restored")?;
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn restart_without_flap(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "restart").await?;
    // successThreshold 3: without trusting the cluster, a restart would show the hosts not ready
    // for two periods.
    let definition = web_definition(&s.ns, &[&h1, &h2]);
    let daemon = Daemon::start_as(cp, &[("web.yaml", definition.clone())], &s.ns)?;
    let both = expect(&[
        ("web-80-tcp-ipv4", &h1, true),
        ("web-80-tcp-ipv4", &h2, true),
    ]);
    slices_become(&s, "web", &both, Duration::from_secs(30)).await?;
    // The Endpoints are written after the slices: wait for them too, then the daemon is at rest.
    watch::until(s.api::<Endpoints>(), OURS, Duration::from_secs(10), |e| {
        e.get("web")
            .is_some_and(|e| endpoints_split(e).0.len() == 2)
    })
    .await?;
    let before = resource_versions(&s).await?;

    // SIGTERM: the daemon exits 0 and leaves every object as it is.
    let code = daemon.stop()?;
    ensure!(code == Some(0), "exit status {code:?}");
    ensure!(
        resource_versions(&s).await? == before,
        "stopping the daemon changed objects"
    );

    let daemon = Daemon::start_as(cp, &[("web.yaml", definition)], &s.ns)?;
    let labels = "kubernetes.io/service-name=web";
    watch::never(
        s.api::<EndpointSlice>(),
        labels,
        Duration::from_secs(5),
        |slices| readiness(slices) != both,
    )
    .await
    .context("a healthy host flapped during the restart")?;
    let probes = daemon.status().await?["probes"]["probesTotal"]
        .as_u64()
        .unwrap_or_default();
    ensure!(
        probes >= 6,
        "the new daemon probed during the window ({probes} probes)"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

/// Two daemons with different `instance` names define the same Service: the one that made it
/// keeps it; the other writes nothing to it (no endless overwriting) and reports why.
async fn other_instance(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let _servers = [h1.serve_tcp(8080)?, h2.serve_tcp(8080)?];
    let s = Scratch::new(cp, "instances").await?;
    let first = Daemon::start(cp, &[("web.yaml", web_definition(&s.ns, &[&h1]))])?;
    let only_h1 = expect(&[("web-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "web", &only_h1, Duration::from_secs(30)).await?;
    let version = s
        .api::<Service>()
        .get("web")
        .await?
        .metadata
        .resource_version;

    let second = Daemon::start(cp, &[("web.yaml", web_definition(&s.ns, &[&h2]))])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let conflicts = loop {
        let conflicts = second.status().await?["clusters"][0]["conflicts"].clone();
        if conflicts.as_object().is_some_and(|c| !c.is_empty()) {
            break conflicts;
        }
        ensure!(
            Instant::now() < deadline,
            "the second daemon reports no conflict\n{}",
            second.log_tail(10)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        conflicts.to_string().contains("instance"),
        "the conflict names the other instance: {conflicts}"
    );
    watch::never(
        s.api::<EndpointSlice>(),
        "kubernetes.io/service-name=web",
        Duration::from_secs(4),
        |slices| readiness(slices) != only_h1,
    )
    .await
    .with_context(|| format!("the slices changed\n{}", second.log_tail(10)))?;
    let now = s
        .api::<Service>()
        .get("web")
        .await?
        .metadata
        .resource_version;
    ensure!(now == version, "the Service was written again");
    drop((first, second));
    s.cleanup().await;
    Ok(())
}

/// A managed Service that someone gives a selector belongs to the endpoints controller from
/// then on: when its definition goes, while running or while stopped, the Service and its
/// Endpoints stay (only the daemon's own slices go).
async fn selector_service_outlives_definition(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let h1 = net.add_host()?;
    let _server = h1.serve_tcp(8080)?;
    let s = Scratch::new(cp, "selector-kept").await?;
    let instance = Daemon::new_instance();
    let daemon = Daemon::start_as(
        cp,
        &[("web.yaml", web_definition(&s.ns, &[&h1]))],
        &instance,
    )?;
    let only_h1 = expect(&[("web-80-tcp-ipv4", &h1, true)]);
    slices_become(&s, "web", &only_h1, Duration::from_secs(30)).await?;
    let selector = serde_json::json!({"spec": {"selector": {"app": "web"}}});
    s.api::<Service>()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&selector),
        )
        .await?;
    watch::until(
        s.api::<EndpointSlice>(),
        "",
        Duration::from_secs(30),
        |sl| sl.is_empty(),
    )
    .await
    .context("the daemon's slices of the refused Service go")?;

    std::fs::remove_file(daemon.definitions_dir().join("web.yaml"))?;
    let gone = |svcs: &BTreeMap<String, Service>| !svcs.contains_key("web");
    watch::never(s.api::<Service>(), "", Duration::from_secs(4), gone)
        .await
        .with_context(|| format!("deleted while running\n{}", daemon.log_tail(10)))?;
    ensure!(daemon.stop()? == Some(0));
    let daemon = Daemon::start_as(cp, &[], &instance)?;
    daemon.status().await?;
    watch::never(s.api::<Service>(), "", Duration::from_secs(4), gone)
        .await
        .with_context(|| format!("deleted on start\n{}", daemon.log_tail(10)))?;
    ensure!(
        s.api::<Endpoints>().get_opt("web").await?.is_some(),
        "its Endpoints stay too"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}
