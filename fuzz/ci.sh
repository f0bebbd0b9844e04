#!/usr/bin/env bash
# CI's bounded fuzzing run (fuzz/README.md): builds every cargo-fuzz target and runs each for
# MORTAR_FUZZ_SECS seconds (default 30) from the checked-in corpus. Exits non-zero on any
# crash, hang or OOM; libFuzzer leaves the input in fuzz/artifacts/TARGET/.
#
# The build is the dev profile without sanitizer: the AddressSanitizer release build takes
# about a quarter of an hour on 2 cores, this one a few minutes, and the code is safe Rust
# apart from a few system calls. Long runs use the default build (README).
#
#   fuzz/ci.sh [--build-only]
set -euo pipefail
cd "$(dirname "$0")"
secs="${MORTAR_FUZZ_SECS:-30}"
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
command -v cargo-fuzz >/dev/null || {
  echo "fuzz/ci.sh: cargo-fuzz is missing (./test.sh installs it: cargo install --locked cargo-fuzz)" >&2
  exit 1
}
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module...); stable
# rustc accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
build=(--dev --sanitizer none)
start=$SECONDS
cargo fuzz build "${build[@]}"
echo "fuzz/ci.sh: built in $((SECONDS - start)) s"
# test.sh builds first, so that the build does not compete with the cluster tests for CPU.
[ "${1:-}" = --build-only ] && exit 0
# New inputs go to a scratch directory, never into the checked-in corpus.
work="$(mktemp -d /var/tmp/mortar-fuzz-ci.XXXXXX)"
trap 'rm -rf "$work"' EXIT
for t in $(cargo fuzz list); do
  mkdir -p "$work/$t"
  t0=$SECONDS
  if ! cargo fuzz run "${build[@]}" "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=60 -print_final_stats=1 \
    >"$work/$t.log" 2>&1; then
    # The panic's own message first: a backtrace alone fills the tail (CI once showed
    # only its last frames, and the input did not fail again when replayed alone).
    grep -E -A 6 'panicked at|ERROR: libFuzzer' "$work/$t.log" | head -n 40 >&2 || true
    tail -n 60 "$work/$t.log" >&2
    echo "fuzz/ci.sh: $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units' "$work/$t.log" || true
  echo "fuzz/ci.sh: $t ran $((SECONDS - t0)) s"
done
echo "fuzz/ci.sh: done in $((SECONDS - start)) s"
