//! Engine-wide probe counters: how many probes ran and how late each started against its
//! schedule (a fixed-bucket histogram, cheap enough for every probe).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the lateness buckets, in milliseconds; the last bucket is unbounded.
const BOUNDS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

#[derive(Debug, Default)]
pub struct ProbeStats {
    probes: AtomicU64,
    lateness: [AtomicU64; BOUNDS_MS.len() + 1],
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub probes_total: u64,
    /// `(upper bound in ms, count)`, cumulative like a Prometheus histogram; `None` = +Inf.
    pub lateness_ms: Vec<(Option<u64>, u64)>,
}

impl ProbeStats {
    pub fn record(&self, lateness: Duration) {
        self.probes.fetch_add(1, Ordering::Relaxed);
        let ms = lateness.as_millis();
        let bucket = BOUNDS_MS
            .iter()
            .position(|b| ms <= u128::from(*b))
            .unwrap_or(BOUNDS_MS.len());
        self.lateness[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut cumulative = 0;
        let lateness_ms = self
            .lateness
            .iter()
            .enumerate()
            .map(|(i, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (BOUNDS_MS.get(i).copied(), cumulative)
            })
            .collect();
        StatsSnapshot {
            probes_total: self.probes.load(Ordering::Relaxed),
            lateness_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_lands_in_cumulative_buckets() {
        let stats = ProbeStats::default();
        for ms in [0, 1, 3, 7000] {
            stats.record(Duration::from_millis(ms));
        }
        let snap = stats.snapshot();
        assert_eq!(snap.probes_total, 4);
        assert_eq!(snap.lateness_ms[0], (Some(1), 2));
        assert_eq!(snap.lateness_ms[2], (Some(5), 3));
        assert_eq!(*snap.lateness_ms.last().unwrap(), (None, 4));
    }
}
