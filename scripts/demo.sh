#!/usr/bin/env bash
# The main job, on loopback: build the three binaries, check the example policies, explain a
# few decisions and diff a change, then run the whole system (`netportd demo`): a server, a
# relay and two portals with a throwaway PKI and examples/policies/quickstart, a small web
# service behind one portal, and one proved round trip. Runs until Ctrl-C (DEMO_ONCE=1: exit
# after the round trip).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/need-openssl.sh
cargo build --release --locked -p netportd -p relayd -p portal
np=./target/release/netportd

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

for dir in examples/policies/*/; do
  step "$np" check "$dir"
done

step "$np" explain examples/policies/company --from carol-laptop2 --service gitlab-ssh
step "$np" explain examples/policies/company --from judy-laptop --service erp-db

# A change as it would come in a pull request: the phone may now also reach the NAS's file
# shares. `check` validates it (embedded tests included); `diff` shows the grant it adds.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r examples/policies/home-lab "$work/new"
cat >> "$work/new/access.toml" <<'TOML'

[[access]]
name = "phone-smb"
from = ["phone"]
listen = "127.0.0.1:4450"
service = "nas-smb"
TOML
step "$np" check "$work/new"
step "$np" diff examples/policies/home-lab "$work/new"

if [ "${DEMO_ONCE:-}" = 1 ]; then
  step "$np" demo --once
else
  step "$np" demo
fi
