//! A hand-built report for the page and metrics tests: one healthy definition, one with a host
//! down whose error carries markup, two clusters (one unusable) and a problem.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::{DefinitionReport, HostReport, PortReport, Reloads, StatusReport};
use crate::model::{Problem, Source};
use crate::probe::state::{HostState, Readiness};
use crate::probe::{HealthBoard, TargetHealth};
use crate::sink::ClusterStatus;

pub const NOW: Duration = Duration::from_secs(1_750_000_000);

pub fn at(secs_before_now: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + NOW - Duration::from_secs(secs_before_now)
}

fn host(ip: &str, readiness: Readiness, error: Option<&str>) -> HostReport {
    let failing = error.is_some();
    let state = HostState {
        readiness,
        consecutive_successes: if failing { 0 } else { 4 },
        consecutive_failures: if failing { 3 } else { 0 },
    };
    let mut health = TargetHealth {
        state,
        since: at(192),
        last_probe: Some(at(2)),
        last_latency_ms: Some(1.25),
        last_result: Some(if failing { "refused" } else { "success" }),
        last_error: error.map(Into::into),
        results: Default::default(),
        transitions: if failing { 2 } else { 1 },
    };
    for _ in 0..4 {
        health.results.record("success");
    }
    for _ in 0..state.consecutive_failures {
        health.results.record("refused");
    }
    HostReport {
        host: ip.parse::<IpAddr>().unwrap(),
        ready: readiness == Readiness::Ready,
        health: Some(health),
    }
}

fn definition(name: &str, hosts: Vec<HostReport>) -> DefinitionReport {
    DefinitionReport {
        namespace: "default".into(),
        name: name.into(),
        source: Source::File,
        origin: format!("endpoints.d/{name}.yaml"),
        ports: vec![PortReport {
            name: "http".into(),
            port: 80,
            target_port: 8080,
            protocol: "TCP",
            probe: Some("tcp"),
            hosts,
        }],
    }
}

/// Hosts: alpha 10.0.0.1 (probed and static, ready); zeta 10.0.0.2 (ready), 10.0.0.3 (refused).
pub fn report() -> StatusReport {
    let mut healthy = definition("alpha", vec![host("10.0.0.1", Readiness::Ready, None)]);
    // A static port: no probe, always ready.
    healthy.ports.push(PortReport {
        name: "admin".into(),
        port: 9000,
        target_port: 9000,
        protocol: "TCP",
        probe: None,
        hosts: vec![HostReport {
            host: "10.0.0.1".parse().unwrap(),
            ready: true,
            health: None,
        }],
    });
    let broken = definition(
        "zeta",
        vec![
            host("10.0.0.2", Readiness::Ready, None),
            host(
                "10.0.0.3",
                Readiness::NotReady,
                Some("<script>alert(1)</script>"),
            ),
        ],
    );
    let east = ClusterStatus {
        name: "east".into(),
        connected: Some(true),
        last_successful_apply: Some(at(75)),
        writes: 7,
        ..Default::default()
    };
    let west = ClusterStatus {
        name: "west".into(),
        connected: Some(false),
        last_error: Some("kubeconfig /etc/west: No such file".into()),
        ..Default::default()
    };
    let problem = Problem {
        origin: "endpoints.d/bad.yaml (document 1)".into(),
        field: "spec.ports[0].hosts[0]".into(),
        value: "<b>bold</b>".into(),
        reason: "not an IP address".into(),
    };
    StatusReport {
        definitions: vec![healthy, broken],
        clusters: vec![east, west],
        problems: vec![problem],
        probes: HealthBoard::default().stats.snapshot(),
        started: true,
        config_reloads: Reloads::default(),
    }
}
