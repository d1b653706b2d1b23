//! Cluster sinks: one per target cluster, applying rendered objects by server-side apply.
mod cluster;

pub use cluster::{ClusterSink, ClusterStatus, connect};
