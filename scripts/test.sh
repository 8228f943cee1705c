#!/usr/bin/env bash
# README command 2: every test tier: unit (a), in-process (b) and network-namespace (c), as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
