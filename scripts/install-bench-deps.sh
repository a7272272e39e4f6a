#!/usr/bin/env bash
# Installs the Debian packages only the benchmarks need (not the tests), if missing.
# golang-cfssl: `cfssl ocsprefresh`, the peer bench/peers.py measures ocspmint against.
# util-linux: `unshare`, for the private network namespace of the `openssl ocsp` responder.
set -euo pipefail
exec bash "$(dirname "$0")/install-system-deps.sh" golang-cfssl util-linux
