#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need first, so it works on a fresh
# machine. Snapshot tests never rewrite snapshots here: a changed snapshot fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export INSTA_UPDATE=no CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust from rustup" >&2; exit 2; }
# The GitOps tests drive real git repositories.
if ! command -v git >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq git
  else
    echo "error: git not found; install it (apt-get install git)" >&2; exit 2
  fi
fi

# The partition test (tests/tests/faults.rs) drives network namespaces and nftables; as root
# it needs them installed, and without root it skips.
if [ "$(id -u)" = 0 ] && ! { command -v ip && command -v nft; } >/dev/null; then
  apt-get update -qq && apt-get install -y -qq iproute2 nftables
fi

# One debug build serves every test binary, the CLI tests and the examples check.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast
