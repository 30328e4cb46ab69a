#!/bin/sh
# pre-commit hook (see .pre-commit-hooks.yaml at the repository root): `netportd check
# --deny-warnings` on each policy directory given as an argument (default: policy/).
# Uses $NETPORTD, else netportd from PATH, else builds it once from this repository (which
# pre-commit has cloned into its cache; the build stays there for the next runs).
set -eu

netportd=${NETPORTD:-}
if [ -z "$netportd" ]; then
  if command -v netportd >/dev/null 2>&1; then
    netportd=netportd
  else
    repo=$(cd "$(dirname "$0")/../.." && pwd)
    if ! command -v cargo >/dev/null 2>&1; then
      echo "netportd-check: netportd is not on PATH and cargo is missing to build it" >&2
      echo "  (install netportd, set NETPORTD=/path/to/netportd, or install Rust)" >&2
      exit 2
    fi
    echo "netportd-check: building netportd in $repo (once)" >&2
    cargo build --release --locked --quiet -p netportd --manifest-path "$repo/Cargo.toml" >&2
    netportd="$repo/target/release/netportd"
  fi
fi

[ $# -gt 0 ] || set -- policy/
status=0
for dir in "$@"; do
  "$netportd" check --deny-warnings "$dir" || status=$?
done
exit "$status"
