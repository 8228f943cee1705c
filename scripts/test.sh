#!/usr/bin/env bash
# README command 2: every test tier: unit (a), in-process (b) and network-namespace (c), as root,
# plus the Kubernetes manifests rendered and schema-validated.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
cargo build --workspace --all-targets
scripts/validate-manifests.sh
cargo test --workspace --no-fail-fast
