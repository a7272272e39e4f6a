#!/usr/bin/env bash
# Installs the Debian packages only the benchmarks need (not the tests), if missing.
# golang-cfssl: `cfssl ocsprefresh`, the peer bench/peers.py measures ocspmint against.
# util-linux: `unshare`, for the private network namespace of the `openssl ocsp` responder.
set -euo pipefail
pkgs=(golang-cfssl util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
