//! Shared support for the integration tests: a real control plane, test hosts in network
//! namespaces with in-process servers, and a small harness that runs trials against them.
//!
//! Included by each test binary with `#[path = "../support/mod.rs"] mod support;`; a binary rarely
//! uses every item, hence the blanket allowances.
#![allow(dead_code, unused_imports)]

pub mod control_plane;
pub mod crd;
pub mod daemon;
pub mod harness;
pub mod hosts;
pub mod namespace;
mod pki;
mod process;
pub mod servers;
pub mod tls;
pub mod watch;

pub use control_plane::ControlPlane;
pub use harness::Case;
pub use hosts::{Host, TestNet};
pub use servers::{HttpRequest, HttpResponse, Server};
