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

# The relay's kernel fast path is compiled with clang (relayd/build.rs); the network
# namespace tests drive ip, ethtool, nft and setpriv. Installed only when missing.
need=()
command -v clang >/dev/null || need+=(clang llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ethtool >/dev/null || need+=(ethtool)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "note: not root, cannot install ${need[*]}: relayd builds without the XDP fast path and the namespace tests skip" >&2
  fi
fi

# One debug build serves every test binary, the CLI tests and the examples check.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast
