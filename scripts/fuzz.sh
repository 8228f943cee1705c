#!/usr/bin/env bash
# Fuzzing (fuzz/README.md): builds every fuzz target once (nightly, libFuzzer, AddressSanitizer,
# one build for all, with the flags cargo-fuzz passes, so `cargo fuzz run` works on the same
# tree), then runs each for SECONDS (default 600), ZMESH_FUZZ_JOBS at a time (default one per
# core), and fails if any of them crashed, ran out of memory or hung. Prints each target's
# executions and coverage.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   scripts/fuzz.sh build      only the build (CI starts it early, beside its other builds)
# CI runs `scripts/fuzz.sh 20` with ZMESH_FUZZ_PROFILE=fuzz-quick. Crash inputs are kept in
# fuzz/artifacts/<target>/ (replay one with
# `fuzz/target/x86_64-unknown-linux-gnu/<profile>/<target> <file>`); the growing corpus in
# fuzz/corpus/<target>/, logs in fuzz/logs/. ZMESH_CARGO_LOCK=<file> makes the cargo commands
# (not the runs) wait on that lock, for a machine shared by several builds.
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=false
if [ "${1:-}" = build ]; then
  build_only=true
  shift
  [ $# -eq 0 ] || { echo "fuzz: 'build' takes no arguments" >&2; exit 1; }
fi
secs=${1:-600}
shift || true
toolchain=${ZMESH_FUZZ_TOOLCHAIN:-nightly}
# The cargo profile the targets build with (fuzz/Cargo.toml): `release` (cargo fuzz's) for real
# campaigns; CI's short runs set `fuzz-quick`, which builds faster and runs a little slower.
profile=${ZMESH_FUZZ_PROFILE:-release}
# Per input: a parser that takes longer than this on a few KiB is a hang, not slowness.
timeout_secs=10
# Per process: well above what any target needs (the corpus included), far below the machine.
rss_limit_mb=2048

die() { echo "fuzz: $*" >&2; exit 1; }
locked() {
  if [ -n "${ZMESH_CARGO_LOCK:-}" ]; then flock "$ZMESH_CARGO_LOCK" "$@"; else "$@"; fi
}
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "SECONDS must be a positive number of seconds, not '$secs'"

# The toolchain: installed when missing, never skipped. Fuzzing needs nightly (-Zsanitizer); the
# project itself builds on stable.
command -v rustup >/dev/null || die "rustup not found: it installs the $toolchain toolchain fuzzing needs"
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing the $toolchain toolchain"
  rustup toolchain install "$toolchain" --profile minimal \
    || die "cannot install the $toolchain toolchain (network? rustup?)"
fi

# One build for every target, in the fuzz workspace's own target dir (fuzz/target), so the
# stable build is untouched. These are the flags `cargo fuzz build` (cargo-fuzz 0.13, its
# defaults) gives rustc: libFuzzer's coverage counters, comparison tracing and stack depth,
# `cfg(fuzzing)`, AddressSanitizer (one codegen unit per crate is in the release profile);
# built directly, CI need not compile cargo-fuzz.
triple=x86_64-unknown-linux-gnu
rustflags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  --cfg fuzzing
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Zsanitizer=address
  -Cllvm-args=-sanitizer-coverage-stack-depth
)
start=$(date +%s)
RUSTFLAGS="${rustflags[*]}" locked cargo "+$toolchain" build --manifest-path fuzz/Cargo.toml \
  --target "$triple" --profile "$profile" --bins || die "the fuzz build failed"
echo "fuzz: build took $(( $(date +%s) - start )) s"
$build_only && exit 0

bin_dir=fuzz/target/$triple/$profile
if [ $# -gt 0 ]; then
  targets=("$@")
else
  # Every [[bin]] of fuzz/Cargo.toml, in file order.
  mapfile -t targets < <(awk '/^\[\[bin\]\]/ { bin = 1; next } /^\[/ { bin = 0 }
    bin && /^name *=/ { gsub(/^name *= *"|" *$/, ""); print }' fuzz/Cargo.toml)
fi
[ ${#targets[@]} -gt 0 ] || die "no fuzz targets found in fuzz/Cargo.toml"

# Targets run side by side, one per core (ZMESH_FUZZ_JOBS): each still gets SECONDS of its
# own core, and CI's wall time is divided by the core count.
jobs=${ZMESH_FUZZ_JOBS:-$(nproc)}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "ZMESH_FUZZ_JOBS must be a positive number, not '$jobs'"
mkdir -p fuzz/logs

# Runs one target; its summary row goes to fuzz/logs/<target>.row, its status to .rc.
run_one() {
  local t=$1 corpus=fuzz/corpus/$1 log=fuzz/logs/$1.log rc=0
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  # Read-only seed dirs after the corpus (libFuzzer writes new inputs into the first dir only).
  local seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds+=("fuzz/seeds/$t")
  case "$t" in
    node_config | waypoint_config) seeds+=(examples) ;;
  esac
  echo "fuzz: $t for ${secs} s"
  # cert_san writes freshly made DER certificates into its corpus at start (never committed).
  ZMESH_FUZZ_CERT_SEEDS=$corpus "$bin_dir/$t" "$corpus" "${seeds[@]}" \
    -max_total_time="$secs" -timeout="$timeout_secs" -rss_limit_mb="$rss_limit_mb" \
    -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  local execs speed last cov ft corp result
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  last=$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -n1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+) .*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+) .*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+\/[^ ]+) .*/\1/p' <<<"$last")
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    result="FAILED (exit $rc)"
    echo "fuzz: $t FAILED; the end of $log:" >&2
    tail -n 40 "$log" >&2
    ls -1 "fuzz/artifacts/$t" >&2 || true
  fi
  printf '%-16s %12s %8s %7s %7s %12s  %s\n' "$t" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result" >"fuzz/logs/$t.row"
  echo "$rc" >"fuzz/logs/$t.rc"
}

for t in "${targets[@]}"; do
  [ -x "$bin_dir/$t" ] || die "no built target '$t' in $bin_dir"
  rm -f "fuzz/logs/$t.row" "fuzz/logs/$t.rc"
done
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  run_one "$t" &
done
wait

rows=()
failed=()
for t in "${targets[@]}"; do
  rows+=("$(cat "fuzz/logs/$t.row" 2>/dev/null || echo "$t (no result)")")
  [ "$(cat "fuzz/logs/$t.rc" 2>/dev/null || echo missing)" = 0 ] || failed+=("$t")
done

echo
printf '%-16s %12s %8s %7s %7s %12s  %s\n' target execs exec/s cov ft corpus result
printf '%s\n' "${rows[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  die "${#failed[@]} target(s) failed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)"
fi
