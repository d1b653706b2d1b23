//! The status server of the real daemon against the real control plane: `/metrics` and
//! `/readyz` as monitoring and orchestrators read them, and the page as a person sees it, in a
//! real headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::daemon::host_status_until;
use crate::support::daemon::{Daemon, free_port};
use crate::support::{Case, ControlPlane, Host, TestNet, namespace};

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "status::metrics_show_a_killed_host_going_not_ready_and_a_removed_one_vanishing",
            metrics_follow_hosts,
        ),
        Case::tokio(
            "status::readyz_waits_for_every_cluster_and_explains_the_unusable_ones",
            readyz,
        ),
        Case::tokio(
            "status::the_page_in_a_real_browser_shows_hosts_clusters_problems_and_a_killed_host",
            page_in_browser,
        ),
    ]
}

/// `web` on port 80 → 8080 of the hosts, probed every second; `extra_host` goes in verbatim.
fn web(ns: &str, hosts: &[&Host], extra_host: Option<&str>) -> String {
    let mut hosts: Vec<String> = hosts.iter().map(|h| format!("\"{}\"", h.ip())).collect();
    hosts.extend(extra_host.map(|h| format!("{h:?}")));
    format!(
        "apiVersion: sealos.io/v1beta1\nkind: ClusterEndpoint\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  periodSeconds: 1\n  ports:\n    - {{name: http, port: 80, targetPort: 8080, hosts: [{}], \
         tcpSocket: {{enable: true}}, timeoutSeconds: 1, failureThreshold: 2}}\n",
        hosts.join(", ")
    )
}

/// The value of the sample `series` (name and labels, exactly as exposed) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// Scrapes `/metrics` until `done` holds for the text (the server has nothing to watch).
async fn metrics_until(
    daemon: &Daemon,
    what: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, content_type, text) = daemon.get("/metrics").await?;
        ensure!(code == 200, "/metrics answered {code}: {text}");
        ensure!(
            content_type.starts_with("application/openmetrics-text"),
            "content type {content_type}"
        );
        if done(&text) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics_follow_hosts(cp: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let server1 = h1.serve_tcp(8080)?;
    let _server2 = h2.serve_tcp(8080)?;
    let client = cp.client();
    let ns = namespace::create(&client, "metrics").await?;
    let daemon = Daemon::start(cp, &[("web.yaml", web(&ns, &[&h1, &h2], None))])?;
    let target = |h: &Host| {
        format!(
            r#"{{namespace="{ns}",name="web",port="http",host="{}"}}"#,
            h.ip()
        )
    };
    let ready = |h: &Host| format!("endpoints_operator_target_ready{}", target(h));

    metrics_until(&daemon, "both hosts ready", Duration::from_secs(30), |t| {
        sample(t, &ready(&h1)) == Some(1.0) && sample(t, &ready(&h2)) == Some(1.0)
    })
    .await?;
    let connected = format!(
        r#"endpoints_operator_cluster_connected{{cluster="{}"}}"#,
        cp.name()
    );
    metrics_until(&daemon, "cluster connected", Duration::from_secs(10), |t| {
        sample(t, &connected) == Some(1.0)
    })
    .await?;

    server1.stop();
    let text = metrics_until(&daemon, "h1 not ready", Duration::from_secs(10), |t| {
        sample(t, &ready(&h1)) == Some(0.0)
    })
    .await?;
    ensure!(
        sample(&text, &ready(&h2)) == Some(1.0),
        "h2 stays ready\n{text}"
    );
    let refused = format!(
        "endpoints_operator_probes_total{}",
        target(&h1).replace('}', r#",result="refused"}"#)
    );
    ensure!(
        sample(&text, &refused).is_some_and(|n| n >= 2.0),
        "{refused} counts the failures\n{text}"
    );
    let transitions = format!("endpoints_operator_transitions_total{}", target(&h1));
    ensure!(
        sample(&text, &transitions) == Some(2.0),
        "unknown → ready → not ready\n{text}"
    );

    // The definition goes away: so do its series, and the reload is counted.
    let reloads = r#"endpoints_operator_config_reloads_total{result="success"}"#;
    let reloads_before = sample(&text, reloads).context("reloads counter")?;
    std::fs::remove_file(daemon.definitions_dir().join("web.yaml"))?;
    let text = metrics_until(&daemon, "web's series gone", Duration::from_secs(10), |t| {
        !t.contains(&format!(r#"namespace="{ns}""#))
    })
    .await?;
    ensure!(
        sample(&text, reloads).is_some_and(|n| n > reloads_before),
        "the reload is counted\n{text}"
    );
    drop(daemon);
    namespace::delete(&client, &ns).await?;
    Ok(())
}

async fn readyz(cp: &'static ControlPlane) -> Result<()> {
    // An API server that accepts connections and never answers: the daemon waits 5 s for it
    // on start, long enough to see /readyz say so.
    let hung = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dir = tempfile::tempdir()?;
    let hung_kubeconfig = dir.path().join("hung.kubeconfig");
    let text = std::fs::read_to_string(cp.kubeconfig_path())?;
    ensure!(
        text.contains(cp.server_url()),
        "kubeconfig names the server"
    );
    std::fs::write(
        &hung_kubeconfig,
        text.replace(cp.server_url(), &format!("https://{}", hung.local_addr()?)),
    )?;
    let extra = format!(
        "[[clusters]]\nname = \"broken\"\nkubeconfig = \"{}\"\n\
         [[clusters]]\nname = \"hung\"\nkubeconfig = \"{}\"\n",
        dir.path().join("missing.kubeconfig").display(),
        hung_kubeconfig.display()
    );
    // No definitions: the clusters must answer without anything to apply.
    let daemon = Daemon::start_with_config(cp, &[], free_port()?, &extra)?;

    let (code, content_type, body) = daemon.get("/readyz").await?;
    ensure!(
        code == 503 && body.contains("not ready  clusters: still being set up"),
        "first answer while the hung cluster is tried: {code}\n{body}"
    );
    ensure!(content_type.starts_with("text/plain"), "{content_type}");
    let healthz = daemon.get("/healthz").await?;
    ensure!(healthz.0 == 200 && healthz.2 == "ok\n", "{healthz:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (code, _, body) = daemon.get("/readyz").await?;
        if code == 200 {
            break body;
        }
        ensure!(code == 503, "{code}\n{body}");
        ensure!(
            Instant::now() < deadline,
            "never ready:\n{body}\n{}",
            daemon.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let line = |start: &str| {
        body.lines()
            .find(|l| l.starts_with(start))
            .with_context(|| format!("no line `{start}…` in\n{body}"))
    };
    line("ok         configuration and definitions loaded: 0 definitions, 0 problems")?;
    line(&format!("ok         cluster {}: answered", cp.name()))?;
    let broken = line("ok         cluster broken: failing, explained: ")?;
    ensure!(broken.contains("missing.kubeconfig"), "{broken}");
    // Its connect timeout and the daemon's own 5 s bound race; either explains it.
    line("ok         cluster hung: failing, explained: listing EndpointSlices: ")?;
    ensure!(!body.contains("not ready"), "{body}");
    drop(daemon);
    drop(hung);
    Ok(())
}

async fn page_in_browser(cp: &'static ControlPlane) -> Result<()> {
    let browser = chromium()?;
    let net = TestNet::new()?;
    let (h1, h2) = (net.add_host()?, net.add_host()?);
    let server1 = h1.serve_tcp(8080)?;
    let _server2 = h2.serve_tcp(8080)?;
    let client = cp.client();
    let ns = namespace::create(&client, "page").await?;
    // The invalid host becomes a problem whose value is markup: the page must show it as text.
    let definition = web(&ns, &[&h1, &h2], Some("<script>alert(1)</script>"));
    let daemon = Daemon::start(cp, &[("web.yaml", definition)])?;
    host_status_until(&daemon, &h2, Duration::from_secs(30), |h| {
        h["ready"] == true
    })
    .await?;
    server1.stop();
    host_status_until(&daemon, &h1, Duration::from_secs(15), |h| {
        h["readiness"] == "notReady"
    })
    .await?;

    let url = format!("http://{}/", daemon.status_addr());
    let dir = tempfile::tempdir()?;
    let dom = run_browser(&browser, dir.path(), &["--dump-dom", &url]).await?;
    let row = |ip: &str| {
        dom.split("<tr")
            .find(|r| r.contains(&format!(">{ip}<")))
            .with_context(|| format!("no row for {ip} in\n{dom}"))
    };
    let down = row(&h1.ip().to_string())?;
    ensure!(
        down.contains("✖ not ready") && down.contains("refused"),
        "{down}"
    );
    let up = row(&h2.ip().to_string())?;
    ensure!(up.contains("✔ ready"), "{up}");
    ensure!(dom.contains(&format!("{ns}/web")), "definition name\n{dom}");
    ensure!(
        dom.contains(&format!("<b>{}</b>", cp.name())),
        "cluster name\n{dom}"
    );
    ensure!(dom.contains("✖ Needs attention"), "verdict\n{dom}");
    ensure!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !dom.contains("<script>alert"),
        "the problem's markup shows as text\n{dom}"
    );

    // Kept where cargo keeps test files, for a person to look at.
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    run_browser(
        &browser,
        dir.path(),
        &[&shot, "--window-size=1280,900", &url],
    )
    .await?;
    let bytes =
        std::fs::read(&png).with_context(|| format!("no screenshot at {}", png.display()))?;
    ensure!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // IHDR: width and height, big-endian, right after the signature and the chunk header.
    let size = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    ensure!(
        bytes.len() > 16 * 1024,
        "a {} byte screenshot is blank",
        bytes.len()
    );
    ensure!(
        (size(16), size(20)) == (1280, 900),
        "{}x{}",
        size(16),
        size(20)
    );
    eprintln!("status page screenshot: {}", png.display());
    drop(daemon);
    namespace::delete(&client, &ns).await?;
    Ok(())
}

/// The Chromium of the machine (`.ci/run` installs it); missing fails the test.
fn chromium() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .context("chromium is not installed (apt-get install chromium)")
}

/// Runs headless Chromium to completion (bounded by `timeout`) and returns its stdout. Off the
/// runtime's threads, which serve the test hosts.
async fn run_browser(browser: &Path, profile: &Path, args: &[&str]) -> Result<String> {
    let mut command = Command::new("timeout");
    command
        .arg("90")
        .arg(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-proxy-server",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output()).await??;
    ensure!(
        out.status.success(),
        "chromium {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
