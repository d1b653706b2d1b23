//! `/metrics` in the OpenMetrics text format. Every series is built at scrape time from the
//! same report as the JSON API, so a target or cluster that went away leaves no stale series.
//! Labels stay bounded: per target its namespace, name, port and host, per cluster its name,
//! and results from the closed set of probe results.

use std::borrow::Cow;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet, text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::{StatusReport, StatusState, report};
use crate::probe::Buckets;

/// What [`text::encode`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const PREFIX: &str = "endpoints_operator";

pub fn registry(state: StatusState) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Live(state)));
    registry
}

pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    text::encode(&mut out, registry)?;
    Ok(out)
}

/// Reads the daemon's state on each scrape.
#[derive(Debug)]
struct Live(StatusState);

impl Collector for Live {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        series(&report(&self.0), encoder)
    }
}

type TargetLabels<'a> = [(&'static str, Cow<'a, str>); 4];

fn series(report: &StatusReport, mut enc: DescriptorEncoder) -> fmt::Result {
    // A Service defined twice (a file and an object, see `Desired::candidates`) is reported once,
    // for its first definition (files come first): equal labels would make duplicate series.
    let mut seen = std::collections::HashSet::new();
    let hosts: Vec<_> = report
        .definitions
        .iter()
        .filter(|d| seen.insert((d.namespace.as_str(), d.name.as_str())))
        .flat_map(|d| d.ports.iter().map(move |p| (d, p)))
        .flat_map(|(d, p)| {
            p.hosts.iter().map(move |h| {
                let labels: TargetLabels = [
                    ("namespace", d.namespace.as_str().into()),
                    ("name", d.name.as_str().into()),
                    ("port", p.name.as_str().into()),
                    ("host", h.host.to_string().into()),
                ];
                (labels, h)
            })
        })
        .collect();
    family(
        &mut enc,
        "target_ready",
        "Whether the host is published as ready on this port (static ports: always 1)",
        MetricType::Gauge,
        hosts
            .iter()
            .map(|(labels, h)| (labels.as_slice(), ConstGauge::new(i64::from(h.ready)))),
    )?;
    let probed: Vec<_> = hosts
        .iter()
        .filter_map(|(labels, h)| Some((labels, h.health.as_ref()?)))
        .collect();
    family(
        &mut enc,
        "probes",
        "Probes of the target by result, since it started (results that never happened are left out)",
        MetricType::Counter,
        probed.iter().flat_map(|(labels, health)| {
            health.results.iter().map(move |(result, n)| {
                let labels = (labels.as_slice(), [("result", result)]);
                (labels, ConstCounter::new(n))
            })
        }),
    )?;
    family(
        &mut enc,
        "transitions",
        "Readiness changes of the target (the first decision included), since it started",
        MetricType::Counter,
        probed
            .iter()
            .map(|(labels, health)| (labels.as_slice(), ConstCounter::new(health.transitions))),
    )?;
    histogram(
        &mut enc,
        "probe_duration",
        "How long probes took, until their result or their timeout",
        &report.probes.duration_ms,
        report.probes.duration_sum_ms,
    )?;
    histogram(
        &mut enc,
        "probe_lateness",
        "How late probes started against their schedule",
        &report.probes.lateness_ms,
        report.probes.lateness_sum_ms,
    )?;

    let clusters = || {
        report
            .clusters
            .iter()
            .map(|c| [("cluster", c.name.as_str())])
    };
    let per_cluster =
        |f: fn(&crate::sink::ClusterStatus) -> u64| clusters().zip(report.clusters.iter().map(f));
    family(
        &mut enc,
        "cluster_connected",
        "Whether the cluster's API server answered the last request (0 before the first)",
        MetricType::Gauge,
        per_cluster(|c| u64::from(c.connected == Some(true))).map(gauge),
    )?;
    family(
        &mut enc,
        "cluster_writes",
        "Create, update and delete calls made to the cluster",
        MetricType::Counter,
        per_cluster(|c| c.writes).map(counter),
    )?;
    family(
        &mut enc,
        "cluster_apply_errors",
        "Failed definition applies in the cluster, retries included",
        MetricType::Counter,
        per_cluster(|c| c.apply_errors).map(counter),
    )?;
    family(
        &mut enc,
        "cluster_pending",
        "Definitions whose last apply to the cluster failed and will be retried",
        MetricType::Gauge,
        per_cluster(|c| c.pending as u64).map(gauge),
    )?;
    family(
        &mut enc,
        "cluster_conflicts",
        "Definitions the daemon refuses to manage in the cluster",
        MetricType::Gauge,
        per_cluster(|c| c.conflicts.len() as u64).map(gauge),
    )?;

    let none: [(&str, &str); 0] = [];
    family(
        &mut enc,
        "definitions",
        "Definitions in force",
        MetricType::Gauge,
        [(none, ConstGauge::new(report.definitions.len() as i64))],
    )?;
    family(
        &mut enc,
        "definition_problems",
        "Problems found in the definitions and the config file",
        MetricType::Gauge,
        [(none, ConstGauge::new(report.problems.len() as i64))],
    )?;
    family(
        &mut enc,
        "config_reloads",
        "Reloads after a file change or SIGHUP, by whether the config file could be used",
        MetricType::Counter,
        [
            ("success", report.config_reloads.succeeded),
            ("failure", report.config_reloads.failed),
        ]
        .map(|(result, n)| ([("result", result)], ConstCounter::new(n))),
    )
}

fn gauge<L>((labels, value): (L, u64)) -> (L, ConstGauge) {
    (labels, ConstGauge::new(value as i64))
}

fn counter<L>((labels, value): (L, u64)) -> (L, ConstCounter) {
    (labels, ConstCounter::new(value))
}

/// One family; its descriptor is written even without series, so every name is always listed.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// An engine-wide histogram in seconds from cumulative millisecond buckets.
fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    cumulative: &Buckets,
    sum_ms: f64,
) -> fmt::Result {
    let mut metric =
        enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    // The encoder accumulates by itself: hand it each bucket's own count.
    let mut below = 0;
    let buckets: Vec<(f64, u64)> = cumulative
        .iter()
        .map(|(bound, count)| {
            let own = count - below;
            below = *count;
            (bound.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0), own)
        })
        .collect();
    metric.encode_histogram::<NoLabelSet>(sum_ms / 1000.0, below, &buckets, None)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::{broadcast, watch};

    use super::*;
    use crate::model::{Check, Definition, DefinitionKey, Desired, Port, Protocol, Source, Timing};
    use crate::probe::{Engine, HealthBoard};
    use crate::status::sample;

    /// Encodes a report built by hand.
    #[derive(Debug)]
    struct Fixed(StatusReport);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            series(&self.0, encoder)
        }
    }

    fn scrape(report: StatusReport) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(Fixed(report)));
        encode(&registry).unwrap()
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "{line}\nmissing from\n{text}"
            );
        }
    }

    #[test]
    fn targets_clusters_and_the_daemon_have_their_series() {
        let text = scrape(sample::report());
        let zeta = r#"namespace="default",name="zeta",port="http""#;
        assert_lines(
            &text,
            &[
                &format!(r#"endpoints_operator_target_ready{{{zeta},host="10.0.0.3"}} 0"#),
                &format!(r#"endpoints_operator_target_ready{{{zeta},host="10.0.0.2"}} 1"#),
                r#"endpoints_operator_target_ready{namespace="default",name="alpha",port="admin",host="10.0.0.1"} 1"#,
                &format!(
                    r#"endpoints_operator_probes_total{{{zeta},host="10.0.0.3",result="refused"}} 3"#
                ),
                &format!(
                    r#"endpoints_operator_probes_total{{{zeta},host="10.0.0.3",result="success"}} 4"#
                ),
                &format!(r#"endpoints_operator_transitions_total{{{zeta},host="10.0.0.3"}} 2"#),
                r#"endpoints_operator_cluster_connected{cluster="east"} 1"#,
                r#"endpoints_operator_cluster_connected{cluster="west"} 0"#,
                r#"endpoints_operator_cluster_writes_total{cluster="east"} 7"#,
                r#"endpoints_operator_cluster_apply_errors_total{cluster="west"} 0"#,
                "endpoints_operator_definitions 2",
                "endpoints_operator_definition_problems 1",
                r#"endpoints_operator_config_reloads_total{result="failure"} 0"#,
                "# TYPE endpoints_operator_probes counter",
                "# EOF",
            ],
        );
        assert!(
            !text.contains(r#"port="admin",host="10.0.0.1",result"#),
            "a static port has no probe results\n{text}"
        );
        assert!(
            !text.contains(r#"result="timeout""#),
            "results that never happened are left out"
        );
    }

    #[test]
    fn histograms_are_in_seconds() {
        let board = HealthBoard::default();
        board.stats.finished(Duration::from_micros(1500));
        board.stats.finished(Duration::from_secs(9));
        let mut report = sample::report();
        report.probes = board.stats.snapshot();
        assert_lines(
            &scrape(report),
            &[
                "# UNIT endpoints_operator_probe_duration_seconds seconds",
                r#"endpoints_operator_probe_duration_seconds_bucket{le="0.001"} 0"#,
                r#"endpoints_operator_probe_duration_seconds_bucket{le="0.002"} 1"#,
                r#"endpoints_operator_probe_duration_seconds_bucket{le="5.0"} 1"#,
                r#"endpoints_operator_probe_duration_seconds_bucket{le="+Inf"} 2"#,
                "endpoints_operator_probe_duration_seconds_count 2",
                "endpoints_operator_probe_duration_seconds_sum 9.0015",
                "endpoints_operator_probe_lateness_seconds_count 0",
            ],
        );
    }

    fn definition() -> Definition {
        Definition {
            key: DefinitionKey {
                namespace: "default".into(),
                name: "web".into(),
            },
            source: Source::File,
            object: None,
            origin: "test".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            cluster_ip: None,
            clusters: None,
            ports: vec![Port {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 1,
                hosts: vec![Ipv4Addr::LOCALHOST.into()],
                check: Some(Arc::new(Check::Tcp)),
                // Never probed during the test: the first probe is an hour away.
                timing: Timing {
                    period: Duration::from_secs(3600),
                    timeout: Duration::from_secs(1),
                    initial_delay: Duration::from_secs(3600),
                    success_threshold: 1,
                    failure_threshold: 1,
                },
            }],
        }
    }

    #[tokio::test]
    async fn a_target_that_went_away_leaves_no_series() {
        let (changes, _) = broadcast::channel(1);
        let mut engine = Engine::new(1, changes);
        let def = definition();
        engine.reconcile([&def]);
        let desired = Desired {
            definitions: BTreeMap::from([(def.id(), def.clone())]),
            ..Desired::default()
        };
        let (desired_tx, desired_rx) = watch::channel(Arc::new(desired));
        let registry = registry(StatusState {
            desired: desired_rx,
            board: engine.board(),
            clusters: Default::default(),
            daemon: Default::default(),
        });
        let target = r#"{namespace="default",name="web",port="http",host="127.0.0.1"}"#;
        assert_lines(
            &encode(&registry).unwrap(),
            &[
                &format!("endpoints_operator_target_ready{target} 0"),
                &format!("endpoints_operator_transitions_total{target} 0"),
            ],
        );

        engine.reconcile([]);
        desired_tx.send_replace(Arc::default());
        let text = encode(&registry).unwrap();
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert_lines(&text, &["# TYPE endpoints_operator_target_ready gauge"]);
        engine.shutdown();
    }

    /// The README's table lists exactly the families `/metrics` has.
    #[test]
    fn the_readme_names_every_metric_and_no_other() {
        // Counters are documented by their sample name, `…_total`.
        let documented: BTreeSet<String> = include_str!("../../README.md")
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("| `endpoints_operator_"))
            .filter_map(|l| l.split('`').next())
            .map(|name| name.trim_end_matches("_total").to_string())
            .collect();
        let exposed: BTreeSet<String> = scrape(sample::report())
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE endpoints_operator_"))
            .filter_map(|l| l.split(' ').next())
            .map(String::from)
            .collect();
        assert_eq!(documented, exposed);
    }
}
