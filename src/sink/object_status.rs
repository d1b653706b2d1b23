//! The status of a `ClusterEndpoint` object, computed from what the daemon knows: whether its
//! spec is valid, whether its objects are applied in its own cluster, and the health of every
//! host. Pure, so equal knowledge gives an equal status and the sink writes only on change;
//! condition transition times move only when a condition's status does.

use std::net::IpAddr;
use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::model::crd::{ClusterEndpointStatus, HostStatus, PortStatus, condition, phase};
use crate::model::{Definition, Port, Problem};
use crate::probe::TargetHealth;
use crate::probe::state::{Readiness, Thresholds};

/// Where the object's definition stands in its own cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Standing {
    /// Its objects are applied: whether the Service, and the slices and Endpoints, are in
    /// line with the current rendering, and the last error if not.
    Applied {
        service: bool,
        endpoints: bool,
        error: Option<String>,
    },
    /// Waiting for the first probe results before its objects are written.
    Waiting,
    /// Another definition of the same Service wins here (origin of the winner).
    Overridden(String),
    /// The daemon refuses to manage the Service (it has a selector, say).
    Refused(String),
}

/// What the status is computed from.
pub struct Inputs<'a> {
    pub generation: Option<i64>,
    /// `None`: the spec has nothing usable.
    pub definition: Option<&'a Definition>,
    pub problems: &'a [Problem],
    pub standing: Standing,
}

pub fn status_of(
    inputs: &Inputs<'_>,
    health: impl Fn(&Port, IpAddr) -> Option<TargetHealth>,
    previous: Option<&ClusterEndpointStatus>,
) -> ClusterEndpointStatus {
    let problems = inputs
        .problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    let mut conditions = Conditions {
        list: Vec::new(),
        previous,
        generation: inputs.generation,
    };
    let Some(def) = inputs.definition else {
        conditions.set(condition::INITIALIZED, false, "InvalidSpec", &problems);
        for kind in [
            condition::SYNC_SERVICE_READY,
            condition::SYNC_ENDPOINT_READY,
            condition::READY,
        ] {
            let message = "the spec has nothing usable; what it applied before is left as it is";
            conditions.set(kind, false, "InvalidSpec", message);
        }
        return ClusterEndpointStatus {
            phase: phase::PENDING.into(),
            conditions: conditions.list,
            observed_generation: inputs.generation,
            ..Default::default()
        };
    };
    if problems.is_empty() {
        conditions.set(condition::INITIALIZED, true, "Valid", "");
    } else {
        conditions.set(condition::INITIALIZED, true, "PartlyInvalid", &problems);
    }

    let before = |port: &Port, host: IpAddr| {
        let ports = previous.into_iter().flat_map(|p| p.ports.iter());
        ports
            .filter(|p| p.name == port.name)
            .flat_map(|p| p.hosts.iter())
            .find(|h| h.host == host.to_string())
    };
    let ports: Vec<PortStatus> = def
        .ports
        .iter()
        .map(|port| PortStatus {
            name: port.name.clone(),
            hosts: port
                .hosts
                .iter()
                .map(|host| host_status(port, *host, health(port, *host), before(port, *host)))
                .collect(),
        })
        .collect();
    let hosts = || ports.iter().flat_map(|p| p.hosts.iter());
    let total = hosts().count();
    let ready = hosts().filter(|h| h.ready).count();

    let synced = match &inputs.standing {
        Standing::Applied {
            service,
            endpoints,
            error,
        } => {
            let why = error.as_deref().unwrap_or("");
            let reason = |ok| if ok { "Applied" } else { "SyncFailed" };
            conditions.set(
                condition::SYNC_SERVICE_READY,
                *service,
                reason(*service),
                why,
            );
            conditions.set(
                condition::SYNC_ENDPOINT_READY,
                *endpoints,
                reason(*endpoints),
                why,
            );
            *service && *endpoints
        }
        other => {
            let (reason, message) = match other {
                Standing::Waiting => ("WaitingForProbes", "waiting for the first probe results"),
                Standing::Overridden(winner) => ("Conflict", winner.as_str()),
                Standing::Refused(why) => ("Refused", why.as_str()),
                Standing::Applied { .. } => unreachable!("handled above"),
            };
            let message = match other {
                Standing::Overridden(_) => {
                    format!("the Service follows {message}, which takes precedence")
                }
                _ => message.to_string(),
            };
            conditions.set(condition::SYNC_SERVICE_READY, false, reason, &message);
            conditions.set(condition::SYNC_ENDPOINT_READY, false, reason, &message);
            false
        }
    };
    let not_ready: Vec<String> = ports
        .iter()
        .flat_map(|p| p.hosts.iter().filter(|h| !h.ready).map(move |h| (p, h)))
        .map(|(p, h)| {
            let port = if p.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.name)
            };
            match &h.last_error {
                Some(e) => format!("{}{port}: {e}", h.host),
                None => format!("{}{port}", h.host),
            }
        })
        .collect();
    let healthy = synced && ready == total && total > 0;
    if !synced {
        conditions.set(
            condition::READY,
            false,
            "NotSynced",
            "objects not applied yet",
        );
    } else if total == 0 {
        conditions.set(
            condition::READY,
            false,
            "NoHosts",
            "no port has a usable host",
        );
    } else if healthy {
        conditions.set(condition::READY, true, "AllHostsReady", "");
    } else {
        let message = format!("{ready}/{total} ready; not ready: {}", not_ready.join(", "));
        conditions.set(condition::READY, false, "HostsNotReady", &message);
    }
    ClusterEndpointStatus {
        phase: match (synced, healthy) {
            (false, _) => phase::PENDING,
            (true, true) => phase::HEALTHY,
            (true, false) => phase::UNHEALTHY,
        }
        .into(),
        conditions: conditions.list,
        observed_generation: inputs.generation,
        ready_hosts: Some(format!("{ready}/{total}")),
        ports,
    }
}

/// One host's status. Until its first probe (after a restart, say) the status it had stands,
/// and `since` stays while readiness does: both only change on what the probes find.
fn host_status(
    port: &Port,
    host: IpAddr,
    health: Option<TargetHealth>,
    before: Option<&HostStatus>,
) -> HostStatus {
    if port.check.is_none() {
        return HostStatus {
            host: host.to_string(),
            ready: true,
            last_result: Some("static".into()),
            ..Default::default()
        };
    }
    let Some(health) = health.filter(|h| h.last_probe.is_some()) else {
        return before.cloned().unwrap_or_else(|| HostStatus {
            host: host.to_string(),
            ..Default::default()
        });
    };
    let thresholds = Thresholds {
        success: port.timing.success_threshold,
        failure: port.timing.failure_threshold,
    };
    let (readiness, successes, failures) = health.settled(thresholds);
    let ready = readiness == Readiness::Ready;
    let since = match before {
        Some(b) if b.ready == ready && b.since.is_some() => b.since.clone(),
        _ => Some(humantime::format_rfc3339_seconds(health.since).to_string()),
    };
    HostStatus {
        host: host.to_string(),
        ready,
        since,
        last_result: health.last_result.map(str::to_string),
        last_error: health.last_error,
        consecutive_successes: successes.into(),
        consecutive_failures: failures.into(),
    }
}

/// Builds the condition list, keeping each condition's transition time while its status holds.
struct Conditions<'a> {
    list: Vec<Condition>,
    previous: Option<&'a ClusterEndpointStatus>,
    generation: Option<i64>,
}

impl Conditions<'_> {
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: &str) {
        let status = if ok { "True" } else { "False" };
        let before = self
            .previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status);
        let last_transition_time = before.map_or_else(now, |c| c.last_transition_time.clone());
        self.list.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.chars().take(MESSAGE_LIMIT).collect(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }
}

/// Condition messages are capped by the API at 32 KiB; a short one reads better anyway.
const MESSAGE_LIMIT: usize = 4096;

fn now() -> Time {
    let now = Timestamp::try_from(SystemTime::now()).unwrap_or(Timestamp::UNIX_EPOCH);
    // Whole seconds, as the API stores them, so a status read back compares equal.
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::model::{Check, DefinitionKey, Protocol, Source, Timing};
    use crate::probe::state::HostState;

    fn definition() -> Definition {
        let port = |name: &str, check: Option<Check>| Port {
            name: name.into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 80,
            hosts: vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
            check: check.map(Arc::new),
            timing: Timing {
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                initial_delay: Duration::ZERO,
                success_threshold: 1,
                failure_threshold: 3,
            },
        };
        Definition {
            key: DefinitionKey {
                namespace: "default".into(),
                name: "db".into(),
            },
            source: Source::Object {
                cluster: "east".into(),
            },
            object: None,
            origin: "test".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            cluster_ip: None,
            clusters: None,
            ports: vec![port("web", Some(Check::Tcp)), port("static", None)],
        }
    }

    fn health(readiness: Readiness, failures: u32) -> TargetHealth {
        TargetHealth {
            state: HostState {
                readiness,
                consecutive_successes: 0,
                consecutive_failures: failures,
            },
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            last_probe: Some(SystemTime::now()),
            last_latency_ms: Some(1.0),
            last_result: Some(if failures > 0 { "refused" } else { "success" }),
            last_error: (failures > 0).then(|| "connection refused".to_string()),
            results: Default::default(),
            transitions: 0,
        }
    }

    fn applied() -> Standing {
        Standing::Applied {
            service: true,
            endpoints: true,
            error: None,
        }
    }

    fn condition<'a>(status: &'a ClusterEndpointStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn one_failing_host_makes_the_object_unhealthy_and_names_the_host() {
        let def = definition();
        let inputs = Inputs {
            generation: Some(4),
            definition: Some(&def),
            problems: &[],
            standing: applied(),
        };
        let status = status_of(
            &inputs,
            |_, host| {
                Some(if host.to_string() == "10.0.0.2" {
                    health(Readiness::NotReady, 7)
                } else {
                    health(Readiness::Ready, 0)
                })
            },
            None,
        );
        assert_eq!(status.phase, "UnHealthy");
        assert_eq!(status.ready_hosts.as_deref(), Some("3/4"));
        assert_eq!(status.observed_generation, Some(4));
        let ready = condition(&status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "HostsNotReady")
        );
        assert!(
            ready.message.contains("10.0.0.2 (web): connection refused"),
            "{}",
            ready.message
        );
        let failing = &status.ports[0].hosts[1];
        // Counts stop at the threshold, so a host that keeps failing changes nothing.
        assert_eq!((failing.ready, failing.consecutive_failures), (false, 3));
        assert_eq!(failing.since.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(
            status.ports[1].hosts[0].last_result.as_deref(),
            Some("static")
        );
    }

    #[test]
    fn equal_knowledge_gives_an_equal_status_and_keeps_transition_times() {
        let def = definition();
        let inputs = Inputs {
            generation: Some(1),
            definition: Some(&def),
            problems: &[],
            standing: applied(),
        };
        let ready = |_: &Port, _| Some(health(Readiness::Ready, 0));
        let mut first = status_of(&inputs, ready, None);
        for c in &mut first.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        let second = status_of(&inputs, ready, Some(&first));
        assert_eq!(first, second);
        assert_eq!(second.phase, "Healthy");

        let failing = |_: &Port, _| Some(health(Readiness::NotReady, 3));
        let third = status_of(&inputs, failing, Some(&second));
        assert_ne!(
            condition(&third, "Ready").last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
        assert_eq!(
            condition(&third, "Initialized").last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
    }

    #[test]
    fn after_a_restart_hosts_keep_their_status_until_probed_and_their_since_while_unchanged() {
        let def = definition();
        let inputs = Inputs {
            generation: Some(1),
            definition: Some(&def),
            problems: &[],
            standing: applied(),
        };
        let before = status_of(&inputs, |_, _| Some(health(Readiness::Ready, 0)), None);
        // A new process: targets started now, not probed yet.
        let fresh = |_: &Port, _| {
            let mut h = health(Readiness::Ready, 0);
            h.last_probe = None;
            h.since = SystemTime::now();
            Some(h)
        };
        assert_eq!(status_of(&inputs, fresh, Some(&before)).ports, before.ports);
        // Probed and still ready: the same since.
        let probed = |_: &Port, _| {
            let mut h = health(Readiness::Ready, 0);
            h.since = SystemTime::now();
            Some(h)
        };
        assert_eq!(
            status_of(&inputs, probed, Some(&before)).ports,
            before.ports
        );
    }

    #[test]
    fn an_object_without_a_usable_host_is_not_healthy() {
        let mut def = definition();
        for port in &mut def.ports {
            port.hosts.clear();
        }
        let inputs = Inputs {
            generation: Some(1),
            definition: Some(&def),
            problems: &[],
            standing: applied(),
        };
        let status = status_of(&inputs, |_, _| None, None);
        assert_eq!(status.phase, "UnHealthy");
        assert_eq!(condition(&status, "Ready").reason, "NoHosts");
        assert_eq!(status.ready_hosts.as_deref(), Some("0/0"));
    }

    #[test]
    fn an_overridden_or_invalid_object_says_why() {
        let def = definition();
        let overridden = Inputs {
            generation: Some(1),
            definition: Some(&def),
            problems: &[],
            standing: Standing::Overridden("files/db.yaml (document 1)".into()),
        };
        let status = status_of(&overridden, |_, _| None, None);
        let sync = condition(&status, "SyncServiceReady");
        assert_eq!(sync.reason, "Conflict");
        assert!(sync.message.contains("files/db.yaml"), "{}", sync.message);
        assert_eq!(status.phase, "Pending");

        let problem = Problem {
            origin: "cluster east: ClusterEndpoint default/db".into(),
            field: "spec.ports".into(),
            value: "[]".into(),
            reason: "at least one port is required".into(),
        };
        let invalid = Inputs {
            generation: Some(2),
            definition: None,
            problems: std::slice::from_ref(&problem),
            standing: Standing::Waiting,
        };
        let status = status_of(&invalid, |_, _| None, None);
        let init = condition(&status, "Initialized");
        assert_eq!(
            (init.status.as_str(), init.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(init.message.contains("at least one port is required"));
    }
}
