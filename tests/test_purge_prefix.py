"""Purges under `[serve] path_prefix`, all real: demo CA (openssl ca +
SoftHSM2) → `ocspmint run` (file store) → `ocspmint serve` with
path_prefix "/ocsp" → Varnish (deploy/varnish/ocspmint.vcl). Relying
parties request GET /ocsp/<b64>, so that is the URL Varnish caches and the
URL a PURGE must name (it named /<b64>: Varnish acknowledged it and kept
serving the old status until max-age)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from cryptography.x509 import ocsp

from cdn import free_port, serve, varnish
from e2e import run_json
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, revoke
from ocspmint.issuer import load_issuers
from ocspmint.served import get_url

PREFIX = "/ocsp"


def prefixed_config(demo: Demo, origin_port: int, cdn_port: int, method: str) -> Path:
    text = demo.config.read_text()
    text += f'\n[serve]\npath_prefix = "{PREFIX}"\n'
    text += (f'\n[[purge]]\nname = "cdn"\ntype = "http"\nmethod = "{method}"\n'
             f'urls = ["http://127.0.0.1:{origin_port}", "http://127.0.0.1:{cdn_port}"]\n')
    text += f'\n[verify_served]\nurl = "http://127.0.0.1:{cdn_port}{PREFIX}"\nsample = "all"\n'
    path = demo.root / f"prefix-{method}.toml"
    path.write_text(text)
    return path


def cdn_get(config: Path, cdn: str, serial: int) -> tuple[str, int]:
    """GET <cdn>/ocsp/<b64> (pyca-built request): the certificate status and
    how many transaction ids Varnish's X-Varnish has (2: a cache hit)."""
    ident = next(iter(load_issuers(load_config(config)).values()))
    with urllib.request.urlopen(get_url(cdn + PREFIX, ident, serial, "sha1"), timeout=30) as reply:
        body, hits = reply.read(), len(reply.headers["X-Varnish"].split())
    return ocsp.load_der_ocsp_response(body).certificate_status.name.lower(), hits


@pytest.mark.parametrize("method", ["purge", "ban"])
def test_a_revocation_purges_the_prefixed_url_varnish_caches(tmp_path: Path, method: str):
    demo = build_demo(tmp_path / "demo", certs=3, precerts=1, revoke=0)
    origin_port, cdn_port = free_port(), free_port()
    config = prefixed_config(demo, origin_port, cdn_port, method)
    no_verify = config.with_name("first-run.toml")  # the first run makes the store folder serve needs
    no_verify.write_text(config.read_text().split("\n[verify_served]")[0])
    rc, summary = run_json(demo, config=no_verify)
    assert rc == 0 and summary["published"] > 0, summary
    with serve(config, tmp_path, origin_port, demo.env()) as origin, varnish(origin, tmp_path, cdn_port) as cdn:
        good = demo.serials["good"][0]
        assert cdn_get(config, cdn, good)[0] == "good"
        assert cdn_get(config, cdn, good) == ("good", 2)  # cached by Varnish under /ocsp/<b64>

        revoke(demo, good, "keyCompromise")
        rc, summary = run_json(demo, config=config)
        assert summary["purges"]["cdn"] == {"sent": 1, "pending": 0, "error": ""}, summary
        assert rc == 0 and not summary["failures"], summary  # verify_served through Varnish sees the revocation
        assert cdn_get(config, cdn, good)[0] == "revoked"
