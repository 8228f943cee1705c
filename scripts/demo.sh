#!/usr/bin/env bash
# README command 1: build zmesh and run the two-node HBONE demo in network namespaces (as root).
# The dev profile (dependencies optimised, see Cargo.toml) is the one scripts/test.sh builds, so
# running the demo first leaves the tests only their own targets to build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
cargo build --workspace --bins
exec target/debug/zmesh-demo target/debug/zmesh-node
