#!/usr/bin/env bash
# Installs the Debian packages ocspmint's demo and tests need, if missing.
# softhsm2: the PKCS#11 token; openssl: CA databases and `openssl ocsp`;
# gcc + libp11-kit-dev: build the fault-injecting PKCS#11 test module;
# gnutls-bin: ocsptool, a second independent OCSP client;
# varnish: the CDN cache in front of `ocspmint serve` in the end-to-end tests;
# faketime: libfaketime, to move the clock of a run (clock-jump tests);
# p11-kit: `p11-kit server` + p11-kit-client.so, the simulated network HSM
# (tests/nethsm.py, bench/nethsm_throughput.py);
# e2fsprogs + mount: an ext4 image loop-mounted as a thin disk (write-back errors).
set -euo pipefail
pkgs=(softhsm2 openssl gcc libc6-dev libp11-kit-dev gnutls-bin varnish faketime p11-kit e2fsprogs mount "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
