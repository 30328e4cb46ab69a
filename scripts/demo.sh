#!/usr/bin/env bash
# The main job, on loopback with the example policies: build netportd, check every example
# policy, explain a few decisions and diff two versions of a policy.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked -p netportd
np=./target/release/netportd

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

for dir in examples/policies/*/; do
  step "$np" check "$dir"
done

step "$np" explain examples/policies/company --from carol-laptop2 --service gitlab-ssh
step "$np" explain examples/policies/company --from judy-laptop --service erp-db
step "$np" explain examples/policies/company --from carol-laptop --service gitlab-ssh --format json

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
