"""Helpers for end-to-end tests: run the CLI in a child process (PKCS#11
state stays out of pytest's process) and check responses with `openssl ocsp`
and pkilint, independent of ocspmint's own verifier."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ocspmint.demo import Demo
from ocspmint.issuer import load_certificate, key_bits
from ocspmint.store import object_key
import hashlib

BIN = Path(sys.executable).parent


def ocspmint(demo: Demo, *args: str, env: dict[str, str] | None = None, config: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``ocspmint <args> --config <demo config>`` with the demo's SOFTHSM2_CONF."""
    cmd = [str(BIN / "ocspmint"), *args, "--config", str(config or demo.config)]
    return subprocess.run(cmd, env={**demo.env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def run_json(demo: Demo, env: dict[str, str] | None = None, config: Path | None = None) -> tuple[int, dict]:
    p = ocspmint(demo, "run", "--json", "--quiet", env=env, config=config)
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout)


def issuer_id(demo: Demo) -> str:
    return hashlib.sha1(key_bits(load_certificate(str(demo.issuing_ca)))).hexdigest()


def response_path(demo: Demo, serial: int, store: str = "responses") -> Path:
    return demo.root / store / object_key(issuer_id(demo), serial)


@dataclass
class OpenSSLView:
    verified: bool
    status: str
    reason: str | None
    this_update: str
    next_update: str
    text: str


def openssl_check(demo: Demo, path: Path, serial: int, digest: str = "sha1") -> OpenSSLView:
    """`openssl ocsp -respin` with the demo chain; parses its text because
    it exits 0 even for unknown or stale responses."""
    cmd = ["openssl", "ocsp", "-respin", str(path), "-issuer", str(demo.issuing_ca), "-CAfile", str(demo.root_ca),
           "-no_nonce", "-resp_text", f"-{digest}", "-serial", f"0x{serial:x}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    out = p.stdout + p.stderr
    m = re.search(rf"^0x{serial:x}: (\w+)$", out, re.M | re.I)
    reason = re.search(r"^\s+Reason: (\w+)", out, re.M)
    this = re.search(r"^\s+This Update: (.+)$", out, re.M)
    nxt = re.search(r"^\s+Next Update: (.+)$", out, re.M)
    return OpenSSLView("Response verify OK" in out, m.group(1) if m else "missing", reason.group(1) if reason else None,
                       this.group(1) if this else "", nxt.group(1) if nxt else "", out)


def pkilint_findings(path: Path) -> list[str]:
    """pkilint's ERROR/FATAL (and WARNING) findings for a DER response."""
    p = subprocess.run([str(BIN / "lint_ocsp_response"), "lint", "--document-format", "DER", str(path)],
                       capture_output=True, text=True, timeout=60)
    return [line.strip() for line in p.stdout.splitlines() if re.search(r"\((ERROR|FATAL|WARNING)\)", line)]


def gnutls_check(demo: Demo, path: Path, serial: int, tmp: Path) -> str:
    """GnuTLS `ocsptool -e` with the certificate's chain: it verifies the
    signature and checks the response against that certificate."""
    chain = tmp / f"chain-{serial:x}.pem"
    chain.write_bytes(demo.cert_path(serial).read_bytes() + demo.issuing_ca.read_bytes())
    p = subprocess.run(["ocsptool", "-e", "--load-trust", str(demo.issuing_ca), "--load-chain", str(chain),
                        "--infile", str(path)], capture_output=True, text=True, timeout=30)
    return p.stdout + p.stderr
