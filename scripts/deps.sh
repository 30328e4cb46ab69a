#!/usr/bin/env bash
# Installs, when missing, what building and testing the relay's kernel fast path needs:
# clang, llvm and libbpf-dev (relayd/build.rs compiles relayd-ebpf/*.c), nftables, iproute2
# and ethtool (the network namespace tests). Run before the first cargo build: build.rs
# decides once whether the XDP program is built, and cargo does not rerun it when clang
# appears later. Without root it only says what is missing.
set -euo pipefail
need=()
command -v clang >/dev/null || need+=(clang llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ethtool >/dev/null || need+=(ethtool)
[ "${#need[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "note: not root, cannot install ${need[*]}: relayd builds without the XDP fast path and the namespace tests skip" >&2
fi
