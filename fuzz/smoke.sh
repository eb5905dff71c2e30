#!/usr/bin/env bash
# Smoke-run every fuzz target for N seconds each (default 20); exit non-zero on a crash, a
# failed invariant, a timeout or an out-of-memory. Works from a clean machine with only the
# stable toolchain: installs cargo-fuzz if missing and lets stable rustc take cargo-fuzz's
# nightly flags (-Zsanitizer=address) through RUSTC_BOOTSTRAP=1.
#
# Usage: bash fuzz/smoke.sh [SECONDS]
# Crashing inputs land in fuzz/artifacts/<target>/; the corpus grows in fuzz/corpus/<target>/.
set -euo pipefail

SECS=${1:-20}
CARGO_FUZZ_VERSION=0.13.2
cd "$(dirname "$0")"

log() { echo "fuzz-smoke: $*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
  log "libfuzzer-sys compiles libFuzzer: a C++ compiler is needed (apt-get install g++)"
  exit 1
fi

# cargo-fuzz passes -Zsanitizer=address and friends; stable rustc accepts them with this.
export RUSTC_BOOTSTRAP=1

start=$SECONDS
cargo fuzz build
log "built in $((SECONDS - start)) s"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=()
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  log "running $t for ${SECS} s"
  if cargo fuzz run "$t" -- \
      -max_total_time="$SECS" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
      >"$logs/$t.log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$logs/$t.log" | sed "s/^/  $t: /" >&2
  else
    tail -n 60 "$logs/$t.log" >&2
    log "FAILED: $t (reproducer in fuzz/artifacts/$t/)"
    failed+=("$t")
  fi
done

log "done in $((SECONDS - start)) s"
if ((${#failed[@]})); then
  log "failed targets: ${failed[*]}"
  exit 1
fi
