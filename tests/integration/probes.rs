//! Each probe kind against real servers on test hosts: the UDP and gRPC cases from real-world
//! reports through the daemon, and the one-shot `probe` command over every kind and failure.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tonic_health::ServingStatus;

use crate::daemon::{Scratch, case_file, expect, host_status_until, slices_become};
use crate::support::daemon::{Daemon, run_cli};
use crate::support::{Case, ControlPlane, HttpResponse, TestNet};

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
        ("udp-silent-dns-ish-ipv4", &h1, true),
        ("udp-silent-dns-ish-ipv4", &h2, false),
        ("udp-silent-dns-ish-long-timeout-ipv4", &h1, true),
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
        ("grpc-no-service-grpc-ipv4", &h1, true),
        ("grpc-no-service-grpc-ipv4", &h2, false),
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
        ("grpc-no-service-grpc-ipv4", &h1, false),
        ("grpc-no-service-grpc-ipv4", &h2, false),
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
",
        up = up.ip(),
        down = down.ip()
    );
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, definition)?;
    let (code, stdout, stderr) = run_cli(&["probe", &file.display().to_string()])?;
    ensure!(code == 1, "exit {code}: {stdout}{stderr}");
    let result = |port: &str, host: std::net::Ipv4Addr| -> Option<(String, f64)> {
        let line = stdout.lines().find(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1) == Some(&port) && cols.get(2) == Some(&host.to_string().as_str())
        })?;
        let cols: Vec<&str> = line.split_whitespace().collect();
        Some((
            cols[4].to_string(),
            cols[5].trim_end_matches("ms").parse().ok()?,
        ))
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
    ];
    for (port, host, want) in expected {
        let (got, latency) =
            result(port, host).with_context(|| format!("no row for {port} {host} in\n{stdout}"))?;
        ensure!(
            got == want,
            "{port} {host}: {got}, expected {want}\n{stdout}"
        );
        ensure!(
            latency < 900.0,
            "{port} {host} took {latency} ms; failures here must not wait for the timeout"
        );
    }
    ensure!(stderr.contains("8 probe(s), 5 failed"), "{stderr}");
    Ok(())
}
