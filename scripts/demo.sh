#!/usr/bin/env bash
# README command 1: build zmesh and run the two-node HBONE demo in network namespaces (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --profile quick-release --workspace --bins
exec target/quick-release/zmesh-demo target/quick-release/zmesh-node
