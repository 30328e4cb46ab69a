#!/usr/bin/env bash
# Fuzzes every target of fuzz/ (cargo-fuzz, libFuzzer) for a bounded time, then replays the
# committed corpus (seeds and the inputs of every crash ever fixed) through each target.
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS (default 20) each, then replay
#   scripts/fuzz.sh control_frame   # one target
#   FUZZ_SECONDS=0 scripts/fuzz.sh  # replay only
#
# New inputs found while fuzzing go to a temporary directory, never into fuzz/corpus/: the
# committed corpus changes only by hand. A crash leaves its input in fuzz/artifacts/TARGET/;
# fix the bug, then copy the input into fuzz/corpus/TARGET/ as a regression seed.
#
# cargo-fuzz needs nightly rustc features. It uses the nightly toolchain when one is
# installed, else stable with RUSTC_BOOTSTRAP=1 (stable ships the sanitizer runtimes too).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
seconds="${FUZZ_SECONDS:-20}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# libFuzzer itself is C++, built by the libfuzzer-sys crate.
if ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq g++
  else
    echo "error: no C++ compiler; install g++" >&2; exit 2
  fi
fi
if rustup run nightly rustc --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  echo "== no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "error: no fuzz targets found" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Policy seeds are whole example policies, several KiB each.
common=(-max_len=65536 -rss_limit_mb=2048 -print_final_stats=1)

for t in "${targets[@]}"; do
  seeds="fuzz/corpus/$t"
  [ -d "$seeds" ] && [ -n "$(ls -A "$seeds")" ] || { echo "error: no seed corpus in $seeds" >&2; exit 1; }
  echo "== fuzz build $t"
  "${fuzz[@]}" build --release "$t"
  if [ "$seconds" -gt 0 ]; then
    echo "== fuzz $t for ${seconds}s"
    mkdir -p "$work/$t"
    "${fuzz[@]}" run --release "$t" "$work/$t" "$seeds" -- \
      "${common[@]}" -max_total_time="$seconds"
  fi
  echo "== replay corpus $t ($(ls "$seeds" | wc -l) inputs)"
  "${fuzz[@]}" run --release "$t" "$seeds" -- "${common[@]}" -runs=0
done
echo "fuzz: ${#targets[@]} targets fuzzed ${seconds}s each, corpora replayed, no crash"
