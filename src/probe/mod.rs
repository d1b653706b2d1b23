//! The probe engine: one prober per protocol behind [`probe`], the threshold state machine, and
//! the scheduler that runs every (definition, port, host) on its own period.

mod budget;
mod engine;
mod grpc;
mod http;
pub mod state;
mod stats;
mod tcp;
mod tls;
mod udp;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use budget::probe_slots;
pub use engine::{Engine, HealthBoard, ServiceHost, TargetHealth, TargetKey};
pub use stats::{Buckets, StatsSnapshot};

use crate::model::Check;

/// Every result a probe can have: `success`, then each [`Failure::label`]. Bounded, so it can
/// label metrics.
pub const RESULTS: [&str; 7] = [
    "success",
    "timeout",
    "refused",
    "unreachable",
    "http_status",
    "not_serving",
    "error",
];

/// Why a probe failed. The variant is the bounded label shown on the status page and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection refused")]
    Refused,
    #[error("host unreachable: {0}")]
    Unreachable(String),
    #[error("HTTP status {0}")]
    HttpStatus(u16),
    #[error("health status {0}")]
    NotServing(String),
    #[error("{0}")]
    Error(String),
}

impl Failure {
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Refused => "refused",
            Failure::Unreachable(_) => "unreachable",
            Failure::HttpStatus(_) => "http_status",
            Failure::NotServing(_) => "not_serving",
            Failure::Error(_) => "error",
        }
    }

    fn from_io(e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Failure::Unreachable(e.to_string())
            }
            io::ErrorKind::TimedOut => Failure::Timeout(Duration::ZERO),
            _ => Failure::Error(e.to_string()),
        }
    }

    /// Client libraries wrap the socket error; find it so refused/unreachable keep their labels.
    fn from_error(e: &(dyn std::error::Error + 'static)) -> Failure {
        let mut source = Some(e);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                return Failure::from_io(io);
            }
            source = err.source();
        }
        Failure::Error(e.to_string())
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<(), Failure>,
    pub latency: Duration,
}

/// Probes `addr` once. Always returns within `timeout`, whatever the protocol does.
pub async fn probe(check: &Check, addr: SocketAddr, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let attempt = async {
        match check {
            Check::Tcp => tcp::probe(addr).await,
            Check::Http(h) => http::probe(h, addr, timeout).await,
            Check::Udp(data) => udp::probe(data, addr).await,
            Check::Grpc(g) => grpc::probe(g, addr, timeout).await,
        }
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(Err(Failure::Timeout(_))) | Err(_) => Err(Failure::Timeout(timeout)),
        Ok(r) => r,
    };
    Outcome {
        result,
        latency: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_label_is_a_known_result() {
        let failures = [
            Failure::Timeout(Duration::ZERO),
            Failure::Refused,
            Failure::Unreachable(String::new()),
            Failure::HttpStatus(500),
            Failure::NotServing(String::new()),
            Failure::Error(String::new()),
        ];
        let labels: Vec<_> = failures.iter().map(Failure::label).collect();
        assert_eq!(labels, RESULTS[1..]);
    }
}
