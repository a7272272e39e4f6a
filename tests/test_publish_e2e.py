"""End to end, all real: demo CA (openssl ca + SoftHSM2) → `ocspmint run` →
S3 (SeaweedFS) → `ocspmint serve` → Varnish (deploy/varnish/ocspmint.vcl) →
`openssl ocsp -url` and GET requests built by pyca cryptography."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.x509 import ocsp

from cdn import VCL, free_port, serve, varnish
from e2e import run_json
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, revoke
from ocspmint.issuer import load_issuers
from ocspmint.served import get_url

REPO = Path(__file__).resolve().parent.parent


@dataclass
class World:
    demo: Demo
    config: Path
    origin: str
    cdn: str
    env: dict[str, str]


def publish_config(demo: Demo, sw, prefix: str, origin_port: int, cdn_port: int, purge: str) -> Path:
    """The demo config with the S3 store, a purge target (origin, then
    Varnish) and verify_served through Varnish for every response."""
    text = demo.config.read_text().replace(
        '[store]\nurl = "file:responses"\n',
        f'[store]\nurl = "s3://{sw.bucket}/{prefix}"\nendpoint = "{sw.endpoint}"\nregion = "{sw.region}"\n')
    assert "s3://" in text
    if purge:
        text += (f'\n[[purge]]\nname = "cdn"\ntype = "http"\nmethod = "{purge}"\n'
                 f'urls = ["http://127.0.0.1:{origin_port}", "http://127.0.0.1:{cdn_port}"]\n')
    text += f'\n[verify_served]\nurl = "http://127.0.0.1:{cdn_port}"\nsample = "all"\n'
    path = demo.root / f"publish-{prefix}.toml"
    path.write_text(text)
    return path


@contextmanager
def world(tmp_path: Path, sw, prefix: str, purge: str = "") -> Iterator[World]:
    """``purge``: the http purge method ("ban", "purge"), or "" for none."""
    demo = build_demo(tmp_path / "demo")
    origin_port, cdn_port = free_port(), free_port()
    config = publish_config(demo, sw, prefix, origin_port, cdn_port, purge)
    env = sw.env()
    with serve(config, tmp_path, origin_port, env) as origin, varnish(origin, tmp_path, cdn_port) as cdn:
        yield World(demo, config, origin, cdn, env)


def run(w: World) -> tuple[int, dict]:
    return run_json(w.demo, env=w.env, config=w.config)


def get_status(w: World, serial: int) -> tuple[str, dict[str, str]]:
    """GET through the CDN; the certificate status and the reply headers."""
    ident = next(iter(load_issuers(load_config(w.config)).values()))
    with urllib.request.urlopen(get_url(w.cdn, ident, serial, "sha1"), timeout=30) as reply:
        body, headers = reply.read(), {k.lower(): v for k, v in reply.headers.items()}
    resp = ocsp.load_der_ocsp_response(body)
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return resp.response_status.name.lower(), headers
    return resp.certificate_status.name.lower(), headers


def openssl_url(w: World, serial: int) -> str:
    """`openssl ocsp -url <CDN>` (OpenSSL sends POST, passed to the origin)."""
    d = w.demo
    p = subprocess.run(["openssl", "ocsp", "-url", w.cdn, "-issuer", str(d.issuing_ca), "-CAfile", str(d.root_ca),
                        "-no_nonce", "-serial", f"0x{serial:x}", "-timeout", "20"], capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    if "unauthorized" in out:
        return "unauthorized"
    m = re.search(rf"^0x{serial:x}: (\w+)$", out, re.M | re.I)
    assert m and "Response verify OK" in out, out
    return m.group(1)


@pytest.mark.parametrize("method", ["ban", "purge"])
def test_s3_origin_varnish_serve_every_status_and_a_revocation_purges_the_cdn(tmp_path: Path, seaweed, method: str):
    with world(tmp_path, seaweed, f"e2e-{method}", method) as w:
        rc, summary = run(w)
        assert rc == 0, summary
        assert summary["published"] > 0 and summary["served_checked"] == summary["published"]
        d = w.demo
        good = next(s for s in d.serials["good"] if s not in d.revoked)
        precert = next(s for s in d.serials["precert"] if s not in d.revoked)
        revoked = next(iter(d.revoked))
        assert openssl_url(w, good) == "good"
        assert openssl_url(w, precert) == "good"
        assert openssl_url(w, revoked) == "revoked"
        assert openssl_url(w, 0x0BADC0DE) == "unauthorized"
        status, _ = get_status(w, 0x0BADC0DE)
        assert status == "unauthorized"

        # The CDN caches the good answer (second GET is a hit) ...
        assert get_status(w, good)[0] == "good"
        status, headers = get_status(w, good)
        assert status == "good" and len(headers["x-varnish"].split()) == 2, headers

        # ... a revocation is published, purged from origin and CDN, and verified through the CDN.
        revoke(d, good, "keyCompromise")
        rc, summary = run(w)
        assert rc == 0, summary
        assert summary["due"] == {"changed": 1} and summary["purges"]["cdn"] == {"sent": 1, "pending": 0, "error": ""}
        assert summary["served_checked"] == 1
        assert get_status(w, good)[0] == "revoked"
        assert openssl_url(w, good) == "revoked"


def test_without_a_purge_the_served_check_catches_the_stale_cdn_answer(tmp_path: Path, seaweed):
    with world(tmp_path, seaweed, "stale") as w:
        rc, summary = run(w)
        assert rc == 0, summary
        good = next(s for s in w.demo.serials["good"] if s not in w.demo.revoked)
        assert get_status(w, good)[0] == "good"
        revoke(w.demo, good, "keyCompromise")
        rc, summary = run(w)
        assert rc == 1
        [failure] = summary["failures"]
        assert failure["stage"] == "served" and int(failure["serial"], 16) == good
        assert "not the response published" in failure["message"] and "status" in failure["message"]
        assert get_status(w, good)[0] == "good"  # what relying parties would still get


def test_readme_shows_the_exact_vcl_the_tests_run():
    readme = (REPO / "README.md").read_text()
    assert "```vcl\n" + VCL.read_text() + "```" in readme
