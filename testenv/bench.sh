#!/usr/bin/env bash
# Runs the benchmark: builds the daemon and the benchmark in release mode, then starts a control
# plane, 100 test hosts with 100 TCP servers each (10,000 targets) and the daemon, measures it at
# rest and while 10 hosts die, prints a table and removes everything. Needs root (it creates
# network namespaces) and the Go toolchain (first run, to build the control plane).
#   testenv/bench.sh                 # period 10 s
#   testenv/bench.sh --period 1      # period 1 s
#   testenv/bench.sh --help          # all flags (--window, --kill drop|rst|both|none, …)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench: run as root (it creates network namespaces)" >&2; exit 1; }
cargo build --quiet --release --bin endpoints-operator --example bench
exec target/release/examples/bench "$@"
