#!/usr/bin/env bash
# Runs the local demo: builds the daemon and the demo, then starts a control plane, test hosts
# and the daemon. Needs root (it creates network namespaces) and the Go toolchain (first run).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
echo "demo: building the daemon and the demo (the first time takes a few minutes)…" >&2
cargo build --quiet --bin endpoints-operator --example demo
exec target/debug/examples/demo "$@"
