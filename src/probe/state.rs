//! The kubelet's threshold rule, counted across periods: a host turns ready after
//! `successThreshold` consecutive successes and not ready after `failureThreshold` consecutive
//! failures. Until the first decision it is `Unknown`, which publishes as not ready.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Readiness {
    Unknown,
    Ready,
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub success: u32,
    pub failure: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostState {
    pub readiness: Readiness,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
}

impl Default for HostState {
    fn default() -> Self {
        HostState {
            readiness: Readiness::Unknown,
            consecutive_successes: 0,
            consecutive_failures: 0,
        }
    }
}

impl HostState {
    /// Records one probe result; returns the new readiness when it changed.
    pub fn record(&mut self, success: bool, t: Thresholds) -> Option<Readiness> {
        let next = if success {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            (self.consecutive_successes >= t.success).then_some(Readiness::Ready)
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            (self.consecutive_failures >= t.failure).then_some(Readiness::NotReady)
        };
        match next {
            Some(r) if r != self.readiness => {
                self.readiness = r;
                Some(r)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Readiness::*;

    /// Feeds results (`+` success, `-` failure) and returns the readiness after each.
    fn run(results: &str, success: u32, failure: u32) -> Vec<Readiness> {
        let mut s = HostState::default();
        let t = Thresholds { success, failure };
        results
            .chars()
            .map(|c| {
                s.record(c == '+', t);
                s.readiness
            })
            .collect()
    }

    #[test]
    fn a_host_starts_unknown_and_one_success_makes_it_ready_by_default() {
        assert_eq!(HostState::default().readiness, Unknown);
        assert_eq!(run("+", 1, 3), [Ready]);
    }

    #[test]
    fn three_failures_in_a_row_mark_the_host_not_ready() {
        assert_eq!(run("+---", 1, 3), [Ready, Ready, Ready, NotReady]);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        assert_eq!(run("+--+--", 1, 3), [Ready; 6]);
        assert_eq!(run("+--+---", 1, 3)[6], NotReady);
    }

    #[test]
    fn recovery_needs_success_threshold_consecutive_successes() {
        assert_eq!(
            run("-+-++", 2, 1),
            [NotReady, NotReady, NotReady, NotReady, Ready]
        );
    }

    #[test]
    fn alternating_results_never_reach_a_threshold_above_one() {
        assert_eq!(run("+-+-+-+-", 2, 2), [Unknown; 8]);
    }

    #[test]
    fn thresholds_of_one_follow_every_result() {
        assert_eq!(run("+-+", 1, 1), [Ready, NotReady, Ready]);
    }

    #[test]
    fn a_new_host_failing_becomes_not_ready_only_at_the_threshold() {
        assert_eq!(run("---", 1, 3), [Unknown, Unknown, NotReady]);
    }

    #[test]
    fn record_reports_only_transitions() {
        let mut s = HostState::default();
        let t = Thresholds {
            success: 1,
            failure: 2,
        };
        assert_eq!(s.record(true, t), Some(Ready));
        assert_eq!(s.record(true, t), None);
        assert_eq!(s.record(false, t), None);
        assert_eq!(s.record(false, t), Some(NotReady));
        assert_eq!(s.record(false, t), None);
        assert_eq!(s.consecutive_failures, 3);
    }

    #[test]
    fn counters_saturate_instead_of_overflowing() {
        let mut s = HostState {
            readiness: NotReady,
            consecutive_successes: 0,
            consecutive_failures: u32::MAX,
        };
        assert_eq!(
            s.record(
                false,
                Thresholds {
                    success: 1,
                    failure: 3
                }
            ),
            None
        );
        assert_eq!(s.consecutive_failures, u32::MAX);
    }
}
