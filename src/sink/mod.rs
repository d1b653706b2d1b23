//! Cluster sinks: one task per target cluster that keeps its Services, EndpointSlices and
//! Endpoints equal to the rendered desired state.

mod apply;
mod client;
mod cluster;
mod drift;
mod events;
mod leader;
mod object_status;
mod report;
mod seed;

pub use client::{WATCH_TIMEOUT_SECS, connect};
pub use cluster::{ClusterSink, ClusterStatus};
pub use leader::Writer;
pub use seed::{ready_hosts, try_ready_hosts};
