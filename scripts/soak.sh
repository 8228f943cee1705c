#!/usr/bin/env bash
# The load tier (tests/load.rs, docs/reliability.md #35-#37) at full size, as root:
#   scripts/soak.sh [DURATION]     DURATION of the measured churn: 600, 90s, 10m, 1h (default 10m)
# 10,000 concurrent checksummed streams, DURATION of connection churn after a warm-up, and the
# mice beside elephants for 30 s a phase. CI runs the same tests at a reduced size (their
# defaults) in `cargo test --workspace`. Any variable below that is already set wins.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10m}
case "$duration" in
  *h) secs=$(( ${duration%h} * 3600 )) ;;
  *m) secs=$(( ${duration%m} * 60 )) ;;
  *s) secs=${duration%s} ;;
  *) secs=$duration ;;
esac
[[ "$secs" =~ ^[0-9]+$ && "$secs" -gt 0 ]] || {
  echo "usage: scripts/soak.sh [DURATION]  (e.g. 600, 90s, 10m, 1h): got '$duration'" >&2
  exit 64
}
[ "$(id -u)" = 0 ] || { echo "scripts/soak.sh builds network namespaces: run it as root" >&2; exit 1; }
export ZMESH_SOAK_SECS=${ZMESH_SOAK_SECS:-$secs}
export ZMESH_LOAD_STREAMS=${ZMESH_LOAD_STREAMS:-10000}
export ZMESH_LOAD_BYTES=${ZMESH_LOAD_BYTES:-65536}
export ZMESH_CHURN_CONCURRENCY=${ZMESH_CHURN_CONCURRENCY:-64}
export ZMESH_MICE_SECS=${ZMESH_MICE_SECS:-30}
echo "soak: $ZMESH_LOAD_STREAMS streams x $ZMESH_LOAD_BYTES B, churn ${ZMESH_SOAK_SECS}s x $ZMESH_CHURN_CONCURRENCY, mice ${ZMESH_MICE_SECS}s"
# Optimized like a deployment (the release profile); the tests take turns, and print their
# series (--nocapture).
cargo test --release --test load -- --nocapture --test-threads=1
