//! `probe FILE…`: probe every host of the given definitions once, concurrently, and print a
//! table. The exit status says whether every probe passed and every definition was valid.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::model::Port;
use crate::probe::{probe, probe_slots};
use crate::sources::files;

/// The result shown for a host of a port without a probe.
const STATIC: &str = "static";

struct Row {
    definition: String,
    port: String,
    host: String,
    kind: &'static str,
    result: &'static str,
    latency_ms: f64,
    error: String,
}

pub async fn run(paths: Vec<PathBuf>) -> ExitCode {
    let loaded = files::load(&paths);
    for problem in &loaded.problems {
        eprintln!("error: {problem}");
    }
    // Every host at once, but never more sockets than the open-files limit allows.
    let slots = Arc::new(Semaphore::new(probe_slots(None).slots));
    let mut probes = JoinSet::new();
    let mut rows = Vec::new();
    for def in loaded.definitions.values() {
        for port in &def.ports {
            let Some(check) = port.check.clone() else {
                // No probe: its hosts are published as always ready; say so rather than skip.
                rows.extend(port.hosts.iter().map(|host| Row {
                    definition: def.key.to_string(),
                    port: port_label(port),
                    host: host.to_string(),
                    kind: "-",
                    result: STATIC,
                    latency_ms: 0.0,
                    error: String::new(),
                }));
                continue;
            };
            for host in &port.hosts {
                let (definition, port_name, host, timing, target_port) = (
                    def.key.to_string(),
                    port_label(port),
                    *host,
                    port.timing,
                    port.target_port,
                );
                let (check, slots) = (check.clone(), slots.clone());
                probes.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let outcome = probe(&check, (host, target_port).into(), timing.timeout).await;
                    Row {
                        definition,
                        port: port_name,
                        host: host.to_string(),
                        kind: check.kind(),
                        result: outcome
                            .result
                            .as_ref()
                            .map_or_else(|f| f.label(), |()| "success"),
                        latency_ms: outcome.latency.as_secs_f64() * 1000.0,
                        error: outcome
                            .result
                            .err()
                            .map(|e| e.to_string())
                            .unwrap_or_default(),
                    }
                });
            }
        }
    }
    rows.extend(probes.join_all().await);
    rows.sort_by(|a, b| (&a.definition, &a.port, &a.host).cmp(&(&b.definition, &b.port, &b.host)));
    println!(
        "{:<28} {:<14} {:<40} {:<6} {:<12} {:>10}  ERROR",
        "DEFINITION", "PORT", "HOST", "KIND", "RESULT", "LATENCY"
    );
    for r in &rows {
        println!(
            "{:<28} {:<14} {:<40} {:<6} {:<12} {:>8.1}ms  {}",
            r.definition, r.port, r.host, r.kind, r.result, r.latency_ms, r.error
        );
    }
    let unprobed = rows.iter().filter(|r| r.result == STATIC).count();
    let failed = rows
        .iter()
        .filter(|r| r.result != "success" && r.result != STATIC)
        .count();
    eprintln!(
        "{} probe(s), {failed} failed, {unprobed} static host(s), {} problem(s)",
        rows.len() - unprobed,
        loaded.problems.len()
    );
    if failed == 0 && loaded.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A port as the table names it: its name, or its target port when it has none.
fn port_label(port: &Port) -> String {
    if port.name.is_empty() {
        port.target_port.to_string()
    } else {
        port.name.clone()
    }
}
