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

step "$np" explain examples/policies/company --from alice-laptop --service git-ssh
step "$np" explain examples/policies/company --from carol-contractor --service finance-db
step "$np" explain examples/policies/company --from alice-laptop --service git-ssh --format json

# A change as it would come in a pull request: a copy of the policy with one grant removed.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r examples/policies/home-lab "$work/old"
cp -r examples/policies/home-lab "$work/new"
step "$np" diff "$work/old" "$work/new" --exit-code
