//! Each probe kind against real servers on test hosts: the UDP and gRPC cases from real-world
//! reports through the daemon, and the one-shot `probe` command over every kind and failure.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tonic_health::ServingStatus;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::daemon::{Scratch, case_file, expect, host_status_until, readiness, slices_become};
use crate::support::daemon::{Daemon, run_cli};
use crate::support::tls::TestCa;
use crate::support::{Case, ControlPlane, HttpRequest, HttpResponse, TestNet, watch};

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "probes::case_udp_silent_host_times_out_and_an_echoing_host_is_ready_at_any_timeout",
            udp_silent_host,
        ),
        Case::tokio(
            "probes::case_grpc_without_service_checks_the_whole_server",
            grpc_without_service,
        ),
        Case::blocking(
            "probes::the_probe_command_prints_each_result_and_fails_on_any_failure",
            |_| probe_command(),
        ),
        Case::tokio(
            "probes::open_files_stay_flat_across_thousands_of_http_grpc_and_udp_probes",
            descriptors_stay_flat,
        ),
        Case::blocking(
            "probes::http_and_tls_follow_kubelet_rules_and_end_within_the_timeout",
            |_| http_and_tls(),
        ),
        Case::tokio(
            "probes::a_small_open_files_limit_queues_probes_instead_of_failing_them",
            small_open_files_limit,
        ),
    ]
}

async fn udp_silent_host(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let echo = h1.serve_udp_echo(5300)?;
    // Bound but never read: datagrams vanish without an ICMP answer.
    let _silent = h2.bind_udp(5300)?;
    let s = Scratch::new(cp, "udp").await?;
    let daemon = Daemon::start(
        cp,
        &[(
            "case.yaml",
            s.localize(&case_file("udp-silent-host.yaml"), &[&h1, &h2]),
        )],
    )?;
    let wanted = expect(&[
        ("udp-silent-5353-udp-ipv4", &h1, true),
        ("udp-silent-5353-udp-ipv4", &h2, false),
        ("udp-silent-5354-udp-ipv4", &h1, true),
    ]);
    slices_become(&s, "udp-silent", &wanted, Duration::from_secs(30)).await?;
    ensure!(echo.hits() > 0, "the echo host received the probes");
    let silent = host_status_until(&daemon, &h2, Duration::from_secs(15), |h| {
        h["readiness"] == "notReady"
    })
    .await?;
    ensure!(silent["lastResult"] == "timeout", "{silent}");
    let latency = silent["lastLatencyMs"].as_f64().context("latency")?;
    ensure!(
        (900.0..1500.0).contains(&latency),
        "a silent host's probe ends at its 1 s timeout, took {latency} ms"
    );
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

async fn grpc_without_service(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let serving = h1.serve_grpc_health(50051, &[("", ServingStatus::Serving)])?;
    let _not_serving = h2.serve_grpc_health(50051, &[("", ServingStatus::NotServing)])?;
    let s = Scratch::new(cp, "grpc").await?;
    let daemon = Daemon::start(
        cp,
        &[(
            "case.yaml",
            s.localize(&case_file("grpc-without-service.yaml"), &[&h1, &h2]),
        )],
    )?;
    let wanted = expect(&[
        ("grpc-no-service-9000-tcp-ipv4", &h1, true),
        ("grpc-no-service-9000-tcp-ipv4", &h2, false),
    ]);
    slices_become(&s, "grpc-no-service", &wanted, Duration::from_secs(30)).await?;
    ensure!(serving.hits() > 0);
    let h2_status = host_status_until(&daemon, &h2, Duration::from_secs(10), |h| {
        h["readiness"] == "notReady"
    })
    .await?;
    ensure!(
        h2_status["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("NOT_SERVING"),
        "{h2_status}"
    );
    // The server goes away: the host turns not ready within failureThreshold periods.
    serving.stop();
    let down = expect(&[
        ("grpc-no-service-9000-tcp-ipv4", &h1, false),
        ("grpc-no-service-9000-tcp-ipv4", &h2, false),
    ]);
    slices_become(&s, "grpc-no-service", &down, Duration::from_secs(3 + 1 + 2)).await?;
    drop(daemon);
    s.cleanup().await;
    Ok(())
}

fn probe_command() -> Result<()> {
    let net = TestNet::new()?;
    let (up, down) = (net.add_host()?, net.add_host()?);
    let _servers = [
        up.serve_tcp(5432)?,
        up.serve_http(8080, |_| HttpResponse::ok("ok"))?,
        up.serve_udp_echo(5300)?,
        up.serve_grpc_health(50051, &[("", ServingStatus::Serving)])?,
        down.serve_http(8080, |_| HttpResponse::new(503))?,
        down.serve_grpc_health(50051, &[("", ServingStatus::Serving)])?,
    ];
    let definition = format!(
        "metadata: {{name: all-kinds}}
spec:
  ports:
    - {{name: tcp, port: 5432, hosts: [{up}, {down}], tcpSocket: {{enable: true}}}}
    - {{name: http, port: 8080, hosts: [{up}, {down}], httpGet: {{path: /}}}}
    - {{name: udp, protocol: UDP, port: 5300, hosts: [{up}, {down}], udpSocket: {{enable: true, data: ping}}}}
    - {{name: grpc, port: 50051, hosts: [{up}, {down}], grpc: {{enable: true, service: payments}}}}
    - {{name: static, port: 9, hosts: [{down}]}}
",
        up = up.ip(),
        down = down.ip()
    );
    let (code, rows, summary) = probe_table(&definition)?;
    ensure!(code == 1, "exit {code}: {rows:?}");
    let result = |port: &str, host: std::net::Ipv4Addr| {
        rows.get(&(port.to_string(), host.to_string())).cloned()
    };
    let expected = [
        ("tcp", up.ip(), "success"),
        ("tcp", down.ip(), "refused"),
        ("http", up.ip(), "success"),
        ("http", down.ip(), "http_status"),
        ("udp", up.ip(), "success"),
        // Nothing bound: the ICMP port unreachable fails the probe at once.
        ("udp", down.ip(), "refused"),
        // The server only knows "": asking for "payments" is an error, not SERVING.
        ("grpc", up.ip(), "error"),
        ("grpc", down.ip(), "error"),
        // No probe: listed as static, neither probed nor failed.
        ("static", down.ip(), "static"),
    ];
    for (port, host, want) in expected {
        let (got, latency) =
            result(port, host).with_context(|| format!("no row for {port} {host} in {rows:?}"))?;
        ensure!(got == want, "{port} {host}: {got}, expected {want}");
        ensure!(
            latency < 900.0,
            "{port} {host} took {latency} ms; failures here must not wait for the timeout"
        );
    }
    ensure!(
        summary.contains("8 probe(s), 5 failed, 1 static host(s)"),
        "{summary}"
    );
    Ok(())
}

/// Runs `endpoints-operator probe` on one definition: (exit code, (port, host) → (result,
/// latency ms), summary line).
type Rows = std::collections::BTreeMap<(String, String), (String, f64)>;
fn probe_table(definition: &str) -> Result<(i32, Rows, String)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("definition.yaml");
    std::fs::write(&file, definition)?;
    let (code, stdout, stderr) = run_cli(&["probe", &file.display().to_string()])?;
    let mut rows = Rows::new();
    for line in stdout.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let [_, port, host, _, result, latency, ..] = cols[..] {
            let latency = latency
                .trim_end_matches("ms")
                .parse()
                .context("latency column")?;
            rows.insert(
                (port.to_string(), host.to_string()),
                (result.to_string(), latency),
            );
        }
    }
    Ok((code, rows, stderr))
}

fn http_and_tls() -> Result<()> {
    let net = TestNet::new()?;
    let host = net.add_host()?;
    let ip = host.ip();
    let ca = TestCa::new()?;
    let other_ca = TestCa::new()?;
    let identity = ca.issue(ip.into(), &["api.internal"])?;
    let responder = move |r: &HttpRequest| match r.path.as_str() {
        "/ok" => HttpResponse::ok("ok"),
        "/slow" => HttpResponse::ok("late").delay(Duration::from_secs(3)),
        "/huge" => HttpResponse::ok(vec![b'x'; 8 << 20]),
        "/loop" => HttpResponse::new(302).header("Location", "/loop"),
        "/hop" => HttpResponse::new(301).header("Location", format!("http://{ip}:8080/ok")),
        "/hop-to-error" => HttpResponse::new(302).header("Location", "/error"),
        "/vhost" if r.header("host") == Some("api.internal") => HttpResponse::ok("vhost"),
        "/vhost" => HttpResponse::new(421),
        _ => HttpResponse::new(500),
    };
    let _http = host.serve_http(8080, responder)?;
    let _https = host.serve_https(8443, identity.rustls_server()?, responder)?;
    let _grpcs = host.serve_grpcs_health(
        50052,
        &[("", ServingStatus::Serving)],
        identity.tonic_server(),
    )?;
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("            {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (ca_pem, other_pem) = (indent(ca.ca_pem()), indent(other_ca.ca_pem()));
    let http = |name: &str, port: u16, path: &str, extra: &str| {
        format!(
            "    - name: {name}\n      port: {port}\n      targetPort: 8080\n      hosts: [{ip}]\n      httpGet:\n        path: {path}\n{extra}"
        )
    };
    let https = |name: &str, port: u16, tls: &str| {
        format!(
            "    - name: {name}\n      port: {port}\n      targetPort: 8443\n      hosts: [{ip}]\n      httpGet:\n        path: /ok\n        scheme: HTTPS\n{tls}"
        )
    };
    let grpc = |name: &str, port: u16, tls: &str| {
        format!(
            "    - name: {name}\n      port: {port}\n      targetPort: 50052\n      hosts: [{ip}]\n      grpc:\n        enable: true\n{tls}"
        )
    };
    let verified = |pem: &str, name: &str| {
        format!("        tls:\n          serverName: {name}\n          caBundle: |\n{pem}\n")
    };
    let ports = [
        http("ok", 1, "/ok", ""),
        http("slow", 2, "/slow", ""),
        http("huge", 3, "/huge", ""),
        http("loop", 4, "/loop", ""),
        http("hop", 5, "/hop", ""),
        http("hop-error", 6, "/hop-to-error", ""),
        http(
            "vhost",
            7,
            "/vhost",
            "        httpHeaders: [{name: Host, value: api.internal}]\n",
        ),
        http("no-vhost", 8, "/vhost", ""),
        https("tls-any", 9, ""),
        https("tls-ca", 10, &verified(&ca_pem, "api.internal")),
        https(
            "tls-ip",
            11,
            &format!("        tls:\n          caBundle: |\n{ca_pem}\n"),
        ),
        https("tls-wrong-ca", 12, &verified(&other_pem, "api.internal")),
        https("tls-wrong-name", 13, &verified(&ca_pem, "db.internal")),
        grpc("grpcs-any", 14, "        tls: {}\n"),
        grpc("grpcs-ca", 15, &verified(&ca_pem, "api.internal")),
        grpc("grpc-plain-to-tls", 16, ""),
    ];
    let definition = format!(
        "metadata: {{name: http-rules}}\nspec:\n  ports:\n{}",
        ports.concat()
    );
    let (code, rows, summary) = probe_table(&definition)?;
    ensure!(code == 1, "{summary}\n{definition}");
    let ip = ip.to_string();
    let expected = [
        ("ok", "success"),
        ("slow", "timeout"),
        ("huge", "success"),
        ("loop", "error"),
        ("hop", "success"),
        ("hop-error", "http_status"),
        ("vhost", "success"),
        ("no-vhost", "http_status"),
        ("tls-any", "success"),
        ("tls-ca", "success"),
        ("tls-ip", "success"),
        ("tls-wrong-ca", "error"),
        ("tls-wrong-name", "error"),
        ("grpcs-any", "success"),
        ("grpcs-ca", "success"),
        ("grpc-plain-to-tls", "error"),
    ];
    for (port, want) in expected {
        let (got, latency) = rows
            .get(&(port.to_string(), ip.clone()))
            .with_context(|| format!("no row for {port}: {rows:?}\n{summary}"))?;
        ensure!(got == want, "{port}: {got}, expected {want}\n{summary}");
        // Every probe ends within its 1 s timeout (plus scheduling slack).
        ensure!(*latency < 1300.0, "{port} took {latency} ms");
    }
    let (_, slow_latency) = &rows[&("slow".to_string(), ip.clone())];
    ensure!(
        *slow_latency >= 950.0,
        "the slow server is cut at the timeout, not before: {slow_latency}"
    );
    Ok(())
}

async fn descriptors_stay_flat(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let host = net.add_host()?;
    let mut servers = Vec::new();
    let mut ports = String::new();
    for i in 0..60u16 {
        servers.push(host.serve_http(8000 + i, |_| HttpResponse::ok("ok"))?);
        servers.push(host.serve_grpc_health(9000 + i, &[("", ServingStatus::Serving)])?);
        servers.push(host.serve_udp_echo(7000 + i)?);
        let ip = host.ip();
        ports.push_str(&format!(
            "    - {{name: h{i}, port: {}, hosts: [{ip}], httpGet: {{path: /}}}}\n\
             \x20   - {{name: g{i}, port: {}, hosts: [{ip}], grpc: {{enable: true}}}}\n\
             \x20   - {{name: u{i}, port: {}, protocol: UDP, hosts: [{ip}], udpSocket: {{enable: true, data: x}}}}\n",
            8000 + i,
            9000 + i,
            7000 + i
        ));
    }
    let definition =
        format!("metadata: {{name: fds}}\nspec:\n  periodSeconds: 1\n  ports:\n{ports}");
    let daemon = Daemon::start(cp, &[("fds.yaml", definition)])?;
    let probes =
        |status: &serde_json::Value| status["probes"]["probesTotal"].as_u64().unwrap_or_default();
    // Warm up until every target has been probed at least twice.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while probes(&daemon.status().await?) < 360 {
        ensure!(
            std::time::Instant::now() < deadline,
            "probes did not start\n{}",
            daemon.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (fds_before, probes_before) = (daemon.open_fds()?, probes(&daemon.status().await?));
    let mut peak = fds_before;
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        peak = peak.max(daemon.open_fds()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (fds_after, probes_after) = (daemon.open_fds()?, probes(&daemon.status().await?));
    ensure!(
        probes_after - probes_before >= 1800,
        "{} probes ran",
        probes_after - probes_before
    );
    // In-flight probes hold a socket each for a moment; nothing may accumulate.
    ensure!(
        fds_after <= fds_before + 30,
        "open files grew from {fds_before} to {fds_after} (peak {peak})"
    );
    ensure!(
        peak <= fds_before + 200,
        "peak of {peak} open files (from {fds_before})"
    );
    let status = daemon.status().await?;
    let not_ready: Vec<_> = status["definitions"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["hosts"][0]["ready"] != true)
        .map(|p| p["name"].clone())
        .collect();
    ensure!(
        not_ready.is_empty(),
        "every target is healthy: {not_ready:?}"
    );
    drop(servers);
    Ok(())
}

/// Under `LimitNOFILE=300`, 300 probes hanging on a silent host at once would leave no
/// descriptor for the healthy host's probe (nor for the API client). The daemon sizes its probe
/// slots to the limit, so probes wait for a slot instead of failing with "Too many open files".
async fn small_open_files_limit(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (silent, healthy) = (net.add_host()?, net.add_host()?);
    silent.drop_packets()?;
    let _server = healthy.serve_tcp(9000)?;
    let s = Scratch::new(cp, "nofile").await?;
    let mut files = Vec::new();
    for d in 0..3 {
        let ports: String = (0..100)
            .map(|i| {
                format!(
                    "    - {{name: p{i}, port: {}, hosts: [{}], tcpSocket: {{enable: true}}}}\n",
                    10_000 + i,
                    silent.ip()
                )
            })
            .collect();
        let text = format!(
            "metadata: {{name: silent-{d}, namespace: {}}}\nspec:\n  periodSeconds: 1\n  ports:\n{ports}",
            s.ns
        );
        files.push((format!("silent-{d}.yaml"), text));
    }
    files.push((
        "healthy.yaml".into(),
        format!(
            "metadata: {{name: healthy, namespace: {}}}\nspec:\n  periodSeconds: 1\n  ports:\n\
             \x20   - {{port: 9000, hosts: [{}], tcpSocket: {{enable: true}}}}\n",
            s.ns,
            healthy.ip()
        ),
    ));
    let files: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let daemon = Daemon::start_with_open_files(cp, &files, 300, "")?;
    let entry = host_status_until(&daemon, &healthy, Duration::from_secs(90), |h| {
        h["results"]["success"].as_u64().unwrap_or_default() >= 3
            || h["results"].as_object().is_some_and(|r| r.len() > 1)
    })
    .await?;
    ensure!(
        entry["ready"] == true && entry["results"].as_object().map(|r| r.len()) == Some(1),
        "the healthy host's probes all succeed: {entry}\n{}",
        daemon.log_tail(20)
    );
    // The silent host's probes time out (not "too many open files") and it goes not ready.
    let silent_entry = host_status_until(&daemon, &silent, Duration::from_secs(90), |h| {
        h["ready"] == false && h["lastResult"].is_string()
    })
    .await?;
    ensure!(
        silent_entry["lastResult"] == "timeout",
        "the silent host times out: {silent_entry}"
    );
    // Hundreds of idle clients of the status server take none of the probes' descriptors: over
    // a window of several probe rounds the healthy host stays ready, and afterwards its record
    // shows more probes, all successful.
    let successes = |h: &serde_json::Value| h["results"]["success"].as_u64().unwrap_or_default();
    let before = successes(&entry);
    // Clients beyond the server's limit and the kernel's backlog time out connecting: fine.
    let attempts = (0..400).map(|_| {
        let connect = tokio::net::TcpStream::connect(daemon.status_addr());
        tokio::time::timeout(Duration::from_secs(2), connect)
    });
    let clients: Vec<tokio::net::TcpStream> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .filter_map(|attempt| attempt.ok()?.ok())
        .collect();
    ensure!(
        clients.len() > 100,
        "only {} clients connected",
        clients.len()
    );
    let healthy_slice = "kubernetes.io/service-name=healthy";
    watch::never(
        s.api::<EndpointSlice>(),
        healthy_slice,
        Duration::from_secs(15),
        |sl| !readiness(sl).values().all(|ready| *ready),
    )
    .await
    .context("the healthy host went not ready during the flood")?;
    drop(clients);
    let entry = host_status_until(&daemon, &healthy, Duration::from_secs(30), |_| true).await?;
    ensure!(
        successes(&entry) >= before + 2 && entry["results"].as_object().map(|r| r.len()) == Some(1),
        "the healthy host's probes all succeed under a flood of status clients: {entry}"
    );
    let log = daemon.log_tail(10_000);
    ensure!(
        !log.contains("Too many open files") && log.contains("probe concurrency"),
        "the daemon ran out of descriptors or never said how many probes it runs:\n{}",
        daemon.log_tail(40)
    );
    s.cleanup().await;
    Ok(())
}
