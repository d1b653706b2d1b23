//! `/readyz`: the daemon is ready once its configuration and definitions are loaded (true before
//! the server listens) and every configured cluster has either answered or has its failure
//! explained on the status page. A cluster that is down does not make the daemon unready: that
//! is shown per cluster, and restarting the daemon would not fix it.

use std::fmt;

use super::plural;
use crate::sink::ClusterStatus;

pub struct Verdict {
    pub ready: bool,
    /// `(passed, what)`, one per check.
    checks: Vec<(bool, String)>,
}

pub fn verdict(
    started: bool,
    definitions: usize,
    problems: usize,
    clusters: &[ClusterStatus],
) -> Verdict {
    let mut checks = vec![(
        true,
        format!(
            "configuration and definitions loaded: {} definition{}, {} problem{}",
            definitions,
            plural(definitions),
            problems,
            plural(problems)
        ),
    )];
    if !started {
        checks.push((false, "clusters: still being set up".to_string()));
    }
    for cluster in clusters {
        let name = &cluster.name;
        checks.push(match (cluster.connected, &cluster.last_error) {
            (Some(true), _) => (true, format!("cluster {name}: answered")),
            (_, Some(error)) => (
                true,
                format!("cluster {name}: failing, explained: {}", one_line(error)),
            ),
            _ => (false, format!("cluster {name}: no answer yet")),
        });
    }
    Verdict {
        ready: checks.iter().all(|(ok, _)| *ok),
        checks,
    }
}

/// Keeps the body one line per check whatever an error message holds.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (ok, what) in &self.checks {
            let mark = if *ok { "ok" } else { "not ready" };
            writeln!(f, "{mark:<9}  {what}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, connected: Option<bool>, error: Option<&str>) -> ClusterStatus {
        ClusterStatus {
            name: name.into(),
            connected,
            last_error: error.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn the_daemon_is_not_ready_while_clusters_are_being_set_up() {
        let v = verdict(false, 2, 0, &[]);
        assert!(!v.ready);
        assert_eq!(
            v.to_string(),
            "ok         configuration and definitions loaded: 2 definitions, 0 problems\n\
             not ready  clusters: still being set up\n"
        );
    }

    #[test]
    fn a_cluster_that_has_not_answered_yet_holds_readiness_back() {
        let v = verdict(true, 1, 1, &[cluster("east", None, None)]);
        assert!(!v.ready);
        assert!(
            v.to_string()
                .contains("not ready  cluster east: no answer yet"),
            "{v}"
        );
    }

    #[test]
    fn answered_and_explained_clusters_are_ready() {
        let clusters = [
            cluster("east", Some(true), Some("an old error")),
            cluster("west", Some(false), Some("kubeconfig /x:\n  not found")),
        ];
        let v = verdict(true, 1, 0, &clusters);
        assert!(v.ready, "{v}");
        assert_eq!(
            v.to_string(),
            "ok         configuration and definitions loaded: 1 definition, 0 problems\n\
             ok         cluster east: answered\n\
             ok         cluster west: failing, explained: kubeconfig /x: not found\n"
        );
    }
}
