#!/bin/sh
# Rerun the tunnel benchmark: installs the Debian peers if missing (as root), builds the
# release binaries, and runs `netport-bench tunnel` with the arguments given
# (e.g. `bench/peers.sh --rounds 5`).
#
# rathole is not installed here (building it takes several minutes); install it once with
#   cargo install rathole --version 0.5.0     # without --locked: its lock file no longer builds
# and it is measured on the next run. Missing peers are skipped with a visible reason.
set -eu
cd "$(dirname "$0")/.."

missing=""
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || missing="$missing stunnel4"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing:$missing"
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq $missing
    else
        echo "missing:$missing (as root: apt-get install -y$missing); those peers are skipped" >&2
    fi
fi
command -v rathole >/dev/null 2>&1 ||
    echo "rathole not on PATH: cargo install rathole --version 0.5.0 (rathole rows are skipped)" >&2

cargo build --release -p netportd -p relayd -p portal -p netport-bench
exec ./target/release/netport-bench tunnel "$@"
