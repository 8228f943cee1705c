#!/usr/bin/env bash
# Regenerates link/zmesh-node.ld, the node's code layout (build.rs; zmesh_testbed::link_order),
# as root: profiles the release node under callgrind through the system benchmark's quick run
# (startup, bulk, round trips, new connections, idle connections, handshakes, restarts), then
# writes the functions that ran in the order they first ran (the first nodes sit idle before any
# traffic, so startup is one block), hottest first among those that first ran together. About 15 minutes on 2 cores.
# It leaves target/release/zmesh-node.unordered, the same code without the layout, for a
# same-run comparison (ZMESH_BASELINE_NODE_BIN, README "Performance"). Rerun it when
# tests/link_order.rs says too few of the script's functions are left, or after a large change
# to what runs at startup or on the data path.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/link-order.sh builds network namespaces: run it as root" >&2; exit 1; }
scripts/setup.sh demo    # iproute2, iptables, nftables: the bench's two-node mesh
command -v valgrind >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind
}
# The profile is of a build laid out without the script, so nothing from the last one can
# steer it. The script's globs take in the hashes of other builds.
ZMESH_NO_LINK_ORDER=1 cargo build --release --bin zmesh-node
cp target/release/zmesh-node target/release/zmesh-node.unordered
cargo build --profile quick-release -p zmesh-testbed --bin zmesh-link-order
dir=$(mktemp -d)
# The profiles are removed once the script is written, and kept (path printed) if anything fails.
trap 'if [ $? = 0 ]; then rm -rf "$dir"; else echo "profiles kept in $dir" >&2; fi' EXIT
# The bench stops its nodes with SIGKILL, before callgrind would write its profile at exit, so it
# writes one every 5M basic blocks (about a second of the node's work under callgrind); when
# each was written tells when its functions first ran.
# Only the nodes are profiled (`run`); the bench's `ca init` runs as it is.
cat > "$dir/node" <<WRAP
#!/bin/sh
node="$PWD/target/release/zmesh-node.unordered"
[ "\$1" = run ] || exec "\$node" "\$@"
exec valgrind --tool=callgrind --demangle=no --dump-every-bb=5000000 --callgrind-out-file="$dir/cg.%p" -q \
  "\$node" "\$@"
WRAP
chmod +x "$dir/node"
ZMESH_NODE_BIN="$dir/node" ZMESH_BENCH_BULK_MB=32 ZMESH_BENCH_IDLE=200 \
  cargo bench --profile quick-release --bench system -- --quick
target/quick-release/zmesh-link-order zmesh-node.unordered link/zmesh-node.ld "$dir"/cg.*
# The release node again, now laid out by the new script.
cargo build --release --bin zmesh-node
