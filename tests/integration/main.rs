//! Integration tests against a real control plane and test hosts in network namespaces.
//!
//! One control plane (context "test") is shared by every trial. To add a feature's tests, create a
//! module here that exports `pub fn cases() -> Vec<support::Case>` and list it in [`SUITES`].

#[path = "../support/mod.rs"]
mod support;

mod clusters;
mod crd;
mod daemon;
mod leader;
mod objects;
mod packaging;
mod plan;
mod probes;
mod reload;
mod smoke;
mod status;

use std::process::ExitCode;

/// The cases of every test module of this binary.
const SUITES: &[fn() -> Vec<support::Case>] = &[
    smoke::cases,
    daemon::cases,
    packaging::cases,
    probes::cases,
    reload::cases,
    clusters::cases,
    crd::cases,
    objects::cases,
    leader::cases,
    plan::cases,
    status::cases,
];

fn main() -> ExitCode {
    support::harness::run("test", SUITES)
}
