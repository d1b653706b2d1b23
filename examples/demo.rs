//! A local demo: a real control plane, three test hosts with real servers, and the daemon
//! publishing them. Type `k` / `r` + Enter to kill and revive a host and watch its EndpointSlice
//! follow; `q` or Ctrl-C ends it and removes everything. Needs root (network namespaces).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use support::daemon::{Daemon, free_port};
use support::{ControlPlane, HttpResponse, TestNet};

fn main() -> Result<()> {
    println!("Starting a local control plane (the first run builds it: about 10 minutes)…");
    let cp = ControlPlane::start("demo")?;
    let result = demo(&cp);
    cp.shutdown();
    result
}

fn demo(cp: &ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let hosts = [net.add_host()?, net.add_host()?, net.add_host()?];
    let mut pg = vec![
        Some(hosts[0].serve_tcp(5432)?),
        Some(hosts[1].serve_tcp(5432)?),
    ];
    let _api = [
        hosts[0].serve_http(8080, |_| HttpResponse::ok("ok"))?,
        hosts[1].serve_http(8080, |_| HttpResponse::ok("ok"))?,
        hosts[2].serve_http(8080, |_| HttpResponse::new(500).body("degraded"))?,
    ];
    let ip = |i: usize| hosts[i].ip().to_string();
    let definitions = format!(
        "apiVersion: sealos.io/v1beta1
kind: ClusterEndpoint
metadata: {{name: postgres, namespace: default}}
spec:
  periodSeconds: 2
  ports:
    - name: pg
      port: 5432
      hosts: [{h0}, {h1}]
      tcpSocket: {{enable: true}}
      failureThreshold: 2
---
apiVersion: sealos.io/v1beta1
kind: ClusterEndpoint
metadata: {{name: api, namespace: default}}
spec:
  periodSeconds: 2
  ports:
    - name: http
      port: 80
      targetPort: 8080
      hosts: [{h0}, {h1}, {h2}]
      httpGet: {{path: /healthz}}
      failureThreshold: 2
",
        h0 = ip(0),
        h1 = ip(1),
        h2 = ip(2)
    );
    let preferred: SocketAddr = "127.0.0.1:9480".parse()?;
    let listen = if std::net::TcpListener::bind(preferred).is_ok() {
        preferred
    } else {
        free_port()?
    };
    let daemon = Daemon::start_on(cp, &[("demo.yaml", definitions)], listen)?;

    println!(
        "\nThe daemon is running.\n\
         \x20 status API:   curl -s http://{listen}/api/v1/status\n\
         \x20 kubeconfig:   {kubeconfig}\n\
         \x20               kubectl --kubeconfig {kubeconfig} get endpointslices -o yaml\n\
         \x20 definitions:  {defs}\n\
         \x20 daemon log:   {log}\n\
         Hosts {h0} and {h1} serve postgres (TCP 5432) and an HTTP API (8080); {h2}'s API answers 500.\n\
         Type k + Enter to kill postgres on {h0}, r + Enter to bring it back, q + Enter to quit.\n",
        kubeconfig = cp.kubeconfig_path().display(),
        defs = daemon.definitions_dir().display(),
        log = daemon.dir().join("daemon.log").display(),
        h0 = ip(0),
        h1 = ip(1),
        h2 = ip(2),
    );

    let runtime = tokio::runtime::Runtime::new()?;
    let client = runtime.block_on(async { cp.client() });
    runtime.spawn(print_slices(Api::namespaced(client, "default")));

    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let (stop_tx, stop) = std::sync::mpsc::channel();
    ctrlc_to(stop_tx.clone());
    loop {
        if stop.try_recv().is_ok() {
            break;
        }
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => match line.trim() {
                "k" => {
                    if let Some(server) = pg[0].take() {
                        server.stop();
                        println!(
                            "→ postgres on {} stopped; it goes not ready after 2 failed probes",
                            ip(0)
                        );
                    }
                }
                "r" => {
                    if pg[0].is_none() {
                        pg[0] = Some(hosts[0].serve_tcp(5432)?);
                        println!(
                            "→ postgres on {} is back; it turns ready at the next probe",
                            ip(0)
                        );
                    }
                }
                "q" => break,
                "" => {}
                other => println!("unknown command {other:?}: k, r or q"),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // No terminal: keep running until Ctrl-C.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = stop.recv();
                break;
            }
        }
    }
    println!("Stopping the daemon, the test hosts and the control plane…");
    drop(daemon);
    drop(pg);
    Ok(())
}

/// Prints each slice's endpoints whenever the API server reports a change.
async fn print_slices(api: Api<EndpointSlice>) {
    let config = watcher::Config::default()
        .labels("endpointslice.kubernetes.io/managed-by=endpoints-operator.sealos.io");
    let mut events = watcher::watcher(api, config).boxed();
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    while let Some(Ok(event)) = events.next().await {
        let slice = match event {
            Event::Apply(s) | Event::InitApply(s) => s,
            _ => continue,
        };
        let name = slice.metadata.name.clone().unwrap_or_default();
        let line = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
                format!(
                    "{} {}",
                    e.addresses.join(","),
                    if ready { "ready" } else { "NOT READY" }
                )
            })
            .collect::<Vec<_>>()
            .join("   ");
        if shown.get(&name) != Some(&line) {
            println!("EndpointSlice {name:<22} {line}");
            shown.insert(name, line);
        }
    }
}

/// Ctrl-C ends the demo through the same path as `q`, so everything is cleaned up.
fn ctrlc_to(stop: std::sync::mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let _ = stop.send(());
    });
}
