#!/usr/bin/env bash
# The portal links to legacy (Python) portals with OpenSSL: the openssl crate builds against
# the system library. Installs its headers when missing (as root), or says how to.
set -euo pipefail
if ! pkg-config --exists openssl 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config
  else
    echo "error: OpenSSL headers not found; install them (apt-get install libssl-dev pkg-config)" >&2
    exit 2
  fi
fi
