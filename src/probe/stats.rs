//! Probe counters: engine-wide, how many probes ran, how late each started against its schedule
//! and how long each took (fixed-bucket histograms, cheap enough for every probe); per target,
//! how many probes ended with each result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::RESULTS;

/// Upper bounds of the histogram buckets, in milliseconds; the last bucket is unbounded.
const BOUNDS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

#[derive(Debug, Default)]
pub struct ProbeStats {
    probes: AtomicU64,
    lateness: Histogram,
    duration: Histogram,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BOUNDS_MS.len() + 1],
    sum_us: AtomicU64,
}

/// `(upper bound in ms, count)`, cumulative like a Prometheus histogram; `None` = +Inf.
pub type Buckets = Vec<(Option<u64>, u64)>;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub probes_total: u64,
    /// How late probes started against their schedule.
    pub lateness_ms: Buckets,
    pub lateness_sum_ms: f64,
    /// How long probes took, until their result or their timeout.
    pub duration_ms: Buckets,
    pub duration_sum_ms: f64,
}

impl ProbeStats {
    /// A probe is starting `lateness` after its scheduled time.
    pub fn started(&self, lateness: Duration) {
        self.probes.fetch_add(1, Ordering::Relaxed);
        self.lateness.observe(lateness);
    }

    pub fn finished(&self, duration: Duration) {
        self.duration.observe(duration);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (lateness_ms, lateness_sum_ms) = self.lateness.snapshot();
        let (duration_ms, duration_sum_ms) = self.duration.snapshot();
        StatsSnapshot {
            probes_total: self.probes.load(Ordering::Relaxed),
            lateness_ms,
            lateness_sum_ms,
            duration_ms,
            duration_sum_ms,
        }
    }
}

impl Histogram {
    fn observe(&self, value: Duration) {
        // In microseconds: whole milliseconds would count 1.9 ms as "≤ 1 ms".
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_MS
            .iter()
            .position(|b| us <= b * 1000)
            .unwrap_or(BOUNDS_MS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative buckets and the sum in milliseconds.
    fn snapshot(&self) -> (Buckets, f64) {
        let mut cumulative = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (BOUNDS_MS.get(i).copied(), cumulative)
            })
            .collect();
        (buckets, self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0)
    }
}

/// Probes of one target by result label. A fixed array, not a map: thousands of targets each
/// carry one, and the labels are a closed set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResultCounts([u64; RESULTS.len()]);

impl ResultCounts {
    pub fn record(&mut self, result: &str) {
        // Every label comes from `RESULTS`; a test holds `Failure::label` to that.
        if let Some(i) = RESULTS.iter().position(|r| *r == result) {
            self.0[i] = self.0[i].saturating_add(1);
        }
    }

    /// `(result, count)` for each result that happened at least once.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        RESULTS
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
    }
}

/// In JSON: `{"success": 12, "refused": 3}`, results that never happened left out.
impl Serialize for ResultCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (result, n) in self.iter() {
            map.serialize_entry(result, &n)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_lands_in_cumulative_buckets() {
        let stats = ProbeStats::default();
        for ms in [0, 1, 3, 7000] {
            stats.started(Duration::from_millis(ms));
        }
        let snap = stats.snapshot();
        assert_eq!(snap.probes_total, 4);
        assert_eq!(snap.lateness_ms[0], (Some(1), 2));
        assert_eq!(snap.lateness_ms[2], (Some(5), 3));
        assert_eq!(*snap.lateness_ms.last().unwrap(), (None, 4));
        assert_eq!(snap.lateness_sum_ms, 7004.0);
    }

    #[test]
    fn durations_are_counted_apart_from_lateness() {
        let stats = ProbeStats::default();
        stats.finished(Duration::from_micros(1500));
        stats.finished(Duration::from_secs(9));
        let snap = stats.snapshot();
        assert_eq!(snap.probes_total, 0);
        assert_eq!(snap.duration_ms[0], (Some(1), 0));
        assert_eq!(snap.duration_ms[1], (Some(2), 1));
        assert_eq!(*snap.duration_ms.last().unwrap(), (None, 2));
        assert_eq!(snap.duration_sum_ms, 9001.5);
    }

    #[test]
    fn result_counts_list_only_results_that_happened() {
        let mut counts = ResultCounts::default();
        for r in ["success", "refused", "success"] {
            counts.record(r);
        }
        assert_eq!(
            counts.iter().collect::<Vec<_>>(),
            [("success", 2), ("refused", 1)]
        );
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"success":2,"refused":1}"#
        );
    }
}
