"""`ocspmint serve` end to end: responses published by a real `ocspmint run`
(SoftHSM2) into a file store, served by `ocspmint serve` in a child process
on a loopback port, fetched with `openssl ocsp -url` (POST) and raw HTTP
(GET/HEAD/POST/PURGE/BAN), checked by `openssl ocsp` and pyca cryptography.
Plus property tests of the request parser (``ocspmint.request``)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from e2e import BIN, openssl_check, run_json
from ocspmint import der
from ocspmint.config import ConfigError, load_config
from ocspmint.config import Store as StoreSettings
from ocspmint.demo import Demo, build_demo, revoke
from ocspmint.encoder import ResponseTemplate, Times
from ocspmint.issuer import IssuerIdentity, issuer_identity
from ocspmint.model import Kind, LedgerEntry, Status
from ocspmint.request import (
    MAX_REQUESTS, CertIdKey, RequestError, build_request, get_paths, parse_get_path, parse_request, request_for,
)
from ocspmint.respcache import parse_stored
from ocspmint.responder import Responder
from ocspmint.s3store import S3Store
from ocspmint.store import FileStore, object_key
from ocspmint.verifier import verify_response

UNAUTHORIZED = bytes.fromhex("3003 0a01 06")
MALFORMED = bytes.fromhex("3003 0a01 01")
INTERNAL_ERROR = bytes.fromhex("3003 0a01 02")
MAX_AGE = 7200  # [serve] max_age of the test config, seconds
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
UTC = dt.timezone.utc


# --- a served copy of the session demo ----------------------------------------


def _q(s: str | Path) -> str:
    return json.dumps(str(s))  # a TOML basic string


SERVE = 'cache_ttl = "PT1H"\nmax_age = "PT2H"'  # the [serve] table of write_config


def write_config(demo: Demo, root: Path, *, hashes: str = '["sha1", "sha256"]', store: Path | None = None,
                 serve: str = SERVE) -> Path:
    """A config for ``demo``'s CA and token whose store and journal live in
    ``root`` (the session demo's own folder is left untouched); ``serve``
    is the body of its [serve] table."""
    cfg = load_config(demo.config)
    issuer, source = cfg.issuers[0], cfg.sources[0]
    text = f"""
state_dir = {_q(root / "state")}
[store]
url = {_q("file:" + str(store or root / "responses"))}
[response]
certid_hashes = {hashes}
[signing]
workers = 1
[serve]
{serve}
[[issuers]]
name = {_q(issuer.name)}
cert = {_q(issuer.cert)}
[issuers.signer]
uri = {_q(issuer.signer.uri)}
module = {_q(issuer.signer.module)}
cert = {_q(issuer.signer.cert)}
pin_file = {_q(issuer.signer.pin_file)}
[[sources]]
type = "openssl-index"
path = {_q(source.path)}
certs_dir = {_q(source.certs_dir)}
issuer = {_q(source.issuer)}
"""
    path = root / "ocspmint.toml"
    path.write_text(text)
    return path


class Server:
    """`ocspmint serve --listen 127.0.0.1:0` as a child process; its port
    comes from the "start" log line."""

    def __init__(self, config: Path, listen: str = "127.0.0.1:0", env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([str(BIN / "ocspmint"), "serve", "--config", str(config), "--listen", listen],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env} if env else None)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        start = self.wait_event("start")
        self.port = int(start["listen"][0].rpartition(":")[2])

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def wait_event(self, event: str) -> dict:
        while True:
            line = self._q.get(timeout=60)
            if line is None:
                raise AssertionError(f"serve exited {self.proc.wait()}: {''.join(self.lines)}")
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                return record

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                source: str | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                          source_address=(source, 0) if source else None)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            reply = conn.getresponse()
            return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@dataclass
class Origin:
    demo: Demo
    root: Path
    config: Path
    issuer: IssuerIdentity
    server: Server

    def store_path(self, serial: int) -> Path:
        return self.root / "responses" / object_key(self.issuer.id, serial)

    def get(self, der_request: bytes, headers: dict[str, str] | None = None, encoded: bool = False):
        return self.server.request("GET", get_paths(der_request)[-1 if encoded else 0], headers)


@pytest.fixture(scope="module")
def origin(demo: Demo, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    config = write_config(demo, root)
    code, summary = run_json(demo, config=config)
    assert code == 0, summary
    server = Server(config)
    yield Origin(demo, root, config, issuer_identity(load_config(config).issuers[0]), server)
    assert server.stop() == 0, "".join(server.lines)
    assert any('"event": "stop"' in line for line in server.lines)


def never_issued(demo: Demo, n: int = 1) -> int:
    used = {s for group in demo.serials.values() for s in group}
    serial = 0x7E57_0000_0000_0000 + n
    assert serial not in used
    return serial


_SIGN_ON_TOKEN = """
import sys
from ocspmint.config import load_config
from ocspmint.issuer import issuer_identity
from ocspmint.signkeys import _Keys, key_spec
ident = issuer_identity(load_config(sys.argv[1]).issuers[0])
keys = _Keys([key_spec(ident)], "python")
keys.open()
try:
    signatures = keys.keys[ident.name].sign([bytes.fromhex(t) for t in sys.stdin.read().split()])
finally:
    keys.close()
print(" ".join(s.hex() for s in signatures))
"""


def tbs_good(ident: IssuerIdentity, serial: int, this_update: dt.datetime, next_update: dt.datetime,
             produced_at: dt.datetime | None = None) -> bytes:
    """ResponseData of a `good` response (SHA-1 CertID only) by the
    project's encoder, producedAt ``produced_at`` (default: now). A
    thisUpdate before the signer's notBefore (the demo's responder
    certificate is minutes old) is moved up to it, as `ocspmint run` does."""
    produced = produced_at or dt.datetime.now(UTC).replace(microsecond=0)
    this_update = max(this_update, ident.signer.cert.not_valid_before_utc)
    template = ResponseTemplate(ident, ("sha1",))
    entry = LedgerEntry(ident.name, serial, Kind.CERTIFICATE, next_update + dt.timedelta(days=365), Status.GOOD)
    return template.tbs(entry, template.time_fields(Times(produced, this_update, next_update)))


def sign_tbs(origin: Origin, tbs: list[bytes]) -> list[bytes]:
    """Full responses for ``tbs`` signed by the demo's delegated responder
    key on its SoftHSM2 token (in a child process, as `ocspmint run` signs),
    for planting in the store under the running server."""
    p = subprocess.run([str(BIN / "python"), "-c", _SIGN_ON_TOKEN, str(origin.config)], input=" ".join(t.hex() for t in tbs),
                       env=origin.demo.env(), capture_output=True, text=True, timeout=60, check=True)
    template = ResponseTemplate(origin.issuer, ("sha1",))
    return [template.response(t, bytes.fromhex(sig)) for t, sig in zip(tbs, p.stdout.split(), strict=True)]


def craft(origin: Origin, serial: int, this_update: dt.datetime, next_update: dt.datetime) -> bytes:
    """A `good` response (SHA-1 CertID only) that ``verify_response``
    accepts, signed like `ocspmint run` signs."""
    return sign_tbs(origin, [tbs_good(origin.issuer, serial, this_update, next_update)])[0]


def plant(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def openssl_url(origin: Origin, serial: int, *extra: str, url: str | None = None) -> str:
    cmd = ["openssl", "ocsp", "-url", url or f"http://127.0.0.1:{origin.server.port}", "-issuer", str(origin.demo.issuing_ca),
           "-CAfile", str(origin.demo.root_ca), "-no_nonce", *extra, "-serial", f"0x{serial:x}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


def assert_error(reply: tuple[int, dict[str, str], bytes], body: bytes) -> None:
    status, headers, data = reply
    assert status == 200 and data == body
    assert headers["content-type"] == "application/ocsp-response"
    assert headers["cache-control"] == "max-age=0, no-cache"
    assert headers["content-length"] == "5"


def http_time(value: str) -> dt.datetime:
    return parsedate_to_datetime(value).astimezone(UTC)


def faked(offset: str) -> dict[str, str]:
    """libfaketime settings (as in test_clock.py): the clock runs ``offset``
    ("+2d") from real time; monotonic time is left alone."""
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


# --- what openssl ocsp -url (a POST client) sees ----------------------------


def test_openssl_gets_good_revoked_and_precert_statuses(origin: Origin) -> None:
    demo = origin.demo
    good = demo.serials["good"][0]
    precert = next(s for s in demo.serials["precert"] if s not in demo.revoked)
    revoked = next(s for s in demo.revoked if demo.revoked[s])
    for serial, expected in ((good, "good"), (precert, "good"), (revoked, "revoked")):
        out = openssl_url(origin, serial)
        assert "Response verify OK" in out, out
        assert re.search(rf"^0x{serial:x}: {expected}$", out, re.M | re.I), out
    assert f"Reason: {demo.revoked[revoked]}" in openssl_url(origin, revoked)


def test_openssl_sha256_certid(origin: Origin) -> None:
    serial = origin.demo.serials["good"][1]
    out = openssl_url(origin, serial, "-sha256")
    assert "Response verify OK" in out and re.search(rf"^0x{serial:x}: good$", out, re.M | re.I), out


def test_never_issued_and_expired_serials_are_unauthorized(origin: Origin) -> None:
    demo = origin.demo
    for serial in (never_issued(demo), demo.serials["expired"][0]):
        assert "Responder Error: unauthorized (6)" in openssl_url(origin, serial)
        assert_error(origin.get(request_for(origin.issuer, serial)), UNAUTHORIZED)
    other_issuer = build_request(os.urandom(20), os.urandom(20), demo.serials["good"][0], "sha1")
    assert_error(origin.get(other_issuer), UNAUTHORIZED)


# --- headers, GET forms, HEAD, 304 --------------------------------------------


def test_success_headers_match_the_response(origin: Origin) -> None:
    serial = origin.demo.serials["good"][2]
    status, headers, body = origin.get(request_for(origin.issuer, serial))
    assert status == 200 and body == origin.store_path(serial).read_bytes()
    singles = list(ocsp.load_der_ocsp_response(body).responses)  # one per CertID hash
    assert len(singles) == 2
    resp = singles[0]
    assert headers["content-type"] == "application/ocsp-response"
    assert headers["content-length"] == str(len(body))
    assert http_time(headers["last-modified"]) == resp.this_update_utc
    assert http_time(headers["expires"]) == resp.next_update_utc
    assert headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert headers["x-ocsp-key"] == f"{origin.issuer.id}/{serial:040x}"
    m = re.fullmatch(r"max-age=(\d+), public, no-transform, must-revalidate", headers["cache-control"])
    assert m, headers["cache-control"]
    max_age = int(m.group(1))
    assert 0 < max_age <= MAX_AGE
    assert http_time(headers["date"]) + dt.timedelta(seconds=max_age) <= resp.next_update_utc


def test_get_forms_all_serve_the_same_bytes(origin: Origin, tmp_path: Path) -> None:
    serial = origin.demo.serials["good"][3]
    stored = origin.store_path(serial).read_bytes()
    sha1 = request_for(origin.issuer, serial, "sha1")
    sha256 = request_for(origin.issuer, serial, "sha256")
    absent = build_request(origin.issuer.name_hash["sha1"], origin.issuer.key_hash["sha1"], serial, "sha1",
                           null_params=False)
    b64 = base64.b64encode(sha1).decode()
    paths = [*get_paths(sha1), *get_paths(sha256), *get_paths(absent),
             "//" + b64,                                     # a base URL with a trailing slash
             "/" + b64.replace("/", "%2f").replace("+", "%2b"),  # lower-case escapes, raw "="
             "/" + base64.urlsafe_b64encode(sha1).decode().rstrip("=")]
    for path in paths:
        status, headers, body = origin.server.request("GET", path)
        assert (status, body) == (200, stored), path
        assert headers["x-ocsp-key"] == f"{origin.issuer.id}/{serial:040x}"
    out = tmp_path / "r.der"
    out.write_bytes(origin.get(sha256, encoded=True)[2])
    view = openssl_check(origin.demo, out, serial, "sha256")
    assert view.verified and view.status == "good", view.text


def _with_nonce(cert_request: bytes, nonce: bytes) -> bytes:
    """``cert_request`` (from build_request) with a requestExtensions nonce."""
    _, s, _ = der.read_tlv(cert_request)
    _, ts, te = der.read_tlv(cert_request, s)
    ext = der.tlv(0x30, der.tlv(0x06, bytes.fromhex("2b0601050507300102")) + der.tlv(0x04, der.tlv(0x04, nonce)))
    tbs = der.tlv(0x30, cert_request[ts:te] + der.tlv(0xA2, der.tlv(0x30, ext)))
    return der.tlv(0x30, tbs)


def test_double_slash_in_base64_kept_or_merged_by_a_proxy(origin: Origin) -> None:
    serial = origin.demo.serials["good"][4]
    stored = origin.store_path(serial).read_bytes()
    plain = request_for(origin.issuer, serial)
    n = 0
    while "//" not in base64.b64encode(req := _with_nonce(plain, n.to_bytes(8, "big"))).decode():
        n += 1
    b64 = base64.b64encode(req).decode()
    for path in ("/" + b64, "/" + b64.replace("//", "/", 1)):
        status, _, body = origin.server.request("GET", path)
        assert (status, body) == (200, stored), path


def test_head_and_if_none_match(origin: Origin) -> None:
    serial = origin.demo.serials["good"][5]
    req = request_for(origin.issuer, serial)
    _, full, body = origin.get(req)
    status, headers, empty = origin.server.request("HEAD", get_paths(req)[0])
    assert (status, empty) == (200, b"")
    assert headers["content-length"] == str(len(body))
    for name in ("etag", "last-modified", "expires", "x-ocsp-key", "content-type"):
        assert headers[name] == full[name]
    for inm in (full["etag"], f'W/{full["etag"]}', f'"other", {full["etag"]}', "*"):
        status, headers, empty = origin.get(req, {"If-None-Match": inm})
        assert (status, empty) == (304, b""), inm
        assert headers["etag"] == full["etag"] and headers["cache-control"].startswith("max-age=")
    assert origin.get(req, {"If-None-Match": '"different"'})[0] == 200


# --- POST and malformed requests ----------------------------------------------


def test_post(origin: Origin) -> None:
    serial = origin.demo.serials["good"][6]
    req = request_for(origin.issuer, serial)
    status, _, body = origin.server.request("POST", "/", {"Content-Type": "application/ocsp-request"}, req)
    assert (status, body) == (200, origin.store_path(serial).read_bytes())
    assert_error(origin.server.request("POST", "/", {"Content-Type": "application/ocsp-request"},
                                       req + b"\0" * 10240), MALFORMED)
    assert_error(origin.server.request("POST", "/", {"Content-Type": "text/plain"}, req), MALFORMED)
    assert_error(origin.server.request("POST", "/", {"Content-Type": "application/ocsp-request"}, b"junk"), MALFORMED)


def test_malformed_get_never_404(origin: Origin) -> None:
    # URL-safe base64 has no "/": a merged-"//" repair could otherwise turn
    # a broken encoding into a valid request for another serial
    good = request_for(origin.issuer, origin.demo.serials["good"][0])
    for path in ("/", "/MEIxxx", "/not*base64", "/" + base64.urlsafe_b64encode(good + b"\0").decode(),
                 "/" + base64.urlsafe_b64encode(good[:-1]).decode(), "/favicon.ico", "/%ff%fe"):
        assert_error(origin.server.request("GET", path), MALFORMED)
    assert origin.server.request("PUT", "/")[0] == 405


def test_several_certificates_in_one_request_are_malformed(origin: Origin) -> None:
    a, b = origin.demo.serials["good"][:2]
    one, two = request_for(origin.issuer, a), request_for(origin.issuer, b)
    _, s1, e1 = der.read_tlv(one, 4)  # requestList of each (outer and tbs headers are 2 bytes each)
    _, s2, e2 = der.read_tlv(two, 4)
    both = der.tlv(0x30, der.tlv(0x30, der.tlv(0x30, one[s1:e1] + two[s2:e2])))
    assert [c.serial for c in parse_request(both)] == [a, b]
    assert_error(origin.get(both), MALFORMED)
    sha1_and_sha256 = request_for(origin.issuer, a, "sha256")
    _, s3, e3 = der.read_tlv(sha1_and_sha256, 4)
    same = der.tlv(0x30, der.tlv(0x30, der.tlv(0x30, one[s1:e1] + sha1_and_sha256[s3:e3])))
    assert origin.get(same)[2] == origin.store_path(a).read_bytes()


# --- the cache: new serials at once, stale bytes until PURGE/BAN ----------------


def test_new_response_is_served_at_once_and_sha256_needs_its_certid(origin: Origin) -> None:
    serial = never_issued(origin.demo, 2)
    req = request_for(origin.issuer, serial)
    assert_error(origin.get(req), UNAUTHORIZED)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    planted = craft(origin, serial, now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
    plant(origin.store_path(serial), planted)
    assert origin.get(req)[2] == planted
    # the planted response has only a SHA-1 SingleResponse: a SHA-256 CertID can't be answered from it
    assert_error(origin.get(request_for(origin.issuer, serial, "sha256")), UNAUTHORIZED)


def test_republished_or_deleted_object_is_never_answered_from_memory(origin: Origin) -> None:
    # cache_ttl is 1 h here: only the per-hit stat of the object can notice a new one
    demo, server = origin.demo, origin.server
    serial = demo.serials["good"][7]
    req = request_for(origin.issuer, serial)
    path = origin.store_path(serial)
    original = path.read_bytes()
    assert origin.get(req)[2] == original  # now cached
    now = dt.datetime.now(UTC).replace(microsecond=0)
    versions = sign_tbs(origin, [tbs_good(origin.issuer, serial, now, now + dt.timedelta(days=1, hours=h))
                                 for h in (1, 2)])
    served = original
    for version in versions:
        before = server.metrics()
        assert origin.get(req)[2] == served  # from memory
        plant(path, version)
        assert origin.get(req)[2] == version  # at once, without a purge
        assert origin.get(req, encoded=True)[2] == version  # and from memory again
        after = server.metrics()
        assert after["ocspmint_serve_cache_hits_total"] - before["ocspmint_serve_cache_hits_total"] == 2
        assert after["ocspmint_serve_cache_misses_total"] - before["ocspmint_serve_cache_misses_total"] == 1
        served = version
    path.unlink()
    try:
        assert_error(origin.get(req), UNAUTHORIZED)  # deleted: not answered from memory either
    finally:
        plant(path, original)
    assert origin.get(req)[2] == original


def test_ban_and_purge_drop_cached_entries(origin: Origin) -> None:
    server = origin.server
    serial = origin.demo.serials["good"][6]
    req = request_for(origin.issuer, serial)
    key = {"X-OCSP-Key": f"{origin.issuer.id}/{serial:040x}"}
    stored = origin.store_path(serial).read_bytes()

    def misses() -> float:
        return server.metrics()["ocspmint_serve_cache_misses_total"]

    assert origin.get(req)[2] == stored  # now cached
    assert server.request("BAN", "/", key, source="127.0.0.2")[0] == 405  # not in purge_from
    status, _, text = server.request("BAN", "/", key)
    assert (status, text) == (200, b"purged 1\n")
    before = misses()
    assert origin.get(req)[2] == stored
    assert misses() == before + 1  # read from the store again
    status, _, text = server.request("PURGE", get_paths(req)[-1])
    assert (status, text) == (200, b"purged 1\n")
    assert origin.get(req)[2] == stored
    status, _, text = server.request("BAN", "/", {"X-OCSP-Issuer": origin.issuer.id})
    assert status == 200 and int(text.split()[1]) >= 1
    assert server.request("BAN", "/", {"X-OCSP-Key": "nonsense"})[0] == 400
    assert server.request("PURGE", "/MEIxxx")[0] == 400


def test_status_change_published_by_run_is_served_at_once(tmp_path: Path) -> None:
    """The review's probe14: `ocspmint run` republishes a serial as revoked;
    no purge reaches the origin; the next request gets `revoked`."""
    own = build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)
    config = write_config(own, tmp_path, hashes='["sha1"]')
    assert run_json(own, config=config)[0] == 0
    ident = issuer_identity(load_config(config).issuers[0])
    serial = own.serials["good"][0]
    path = get_paths(request_for(ident, serial))[0]
    server = Server(config)
    try:
        for _ in range(2):  # the second from memory
            status, headers, body = server.request("GET", path)
            assert status == 200 and ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.GOOD
            assert "public" in headers["cache-control"]
        assert server.metrics()["ocspmint_serve_cache_hits_total"] >= 1
        revoke(own, serial, "keyCompromise")
        code, summary = run_json(own, config=config)
        assert code == 0, summary
        status, headers, body = server.request("GET", path)
        resp = ocsp.load_der_ocsp_response(body)
        assert status == 200 and resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
        assert resp.revocation_reason == x509.ReasonFlags.key_compromise
        assert headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    finally:
        assert server.stop() == 0


def test_cache_ttl_default_is_off_for_a_store_without_revalidation(demo: Demo, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # S3Store needs credentials, never used: no request is made
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s3 = S3Store("s3://bucket/prefix", StoreSettings(url="s3://bucket/prefix", endpoint="http://127.0.0.1:9",
                                                     region="us-east-1"))
    try:
        for serve, file_ttl, s3_ttl in (("", 60, 0), ('cache_ttl = "PT30S"', 30, 30), ('cache_ttl = "PT0S"', 0, 0)):
            cfg = load_config(write_config(demo, tmp_path, serve=serve))
            ident = issuer_identity(cfg.issuers[0])
            assert Responder(cfg, [ident], FileStore(tmp_path / "responses")).cache.ttl == file_ttl, serve
            assert Responder(cfg, [ident], s3).cache.ttl == s3_ttl, serve
    finally:
        s3.close()


def test_response_past_next_update_is_served_uncached(origin: Origin) -> None:
    # the demo's responder certificate is minutes old: a response that verifies cannot have
    # expired yet, so this server's clock runs two days ahead (libfaketime)
    demo = origin.demo
    serial = demo.serials["expired"][0]
    this_update = origin.issuer.signer.cert.not_valid_before_utc
    next_update = this_update + dt.timedelta(hours=8)
    stale = craft(origin, serial, this_update, next_update)
    path = origin.store_path(serial)
    req = get_paths(request_for(origin.issuer, serial))[0]
    plant(path, stale)
    server = Server(origin.config, env=faked("+2d"))
    try:
        try:
            status, headers, body = server.request("GET", req)
        finally:
            path.unlink()
        assert (status, body) == (200, stale)
        assert headers["cache-control"] == "max-age=0, no-cache"
        assert http_time(headers["expires"]) == next_update
        assert server.metrics()["ocspmint_serve_requests_total{result=expired}"] == 1
        assert_error(server.request("GET", req), UNAUTHORIZED)  # gone from the store: not cached
    finally:
        assert server.stop() == 0


def test_mis_keyed_stored_response_is_an_internal_error(origin: Origin) -> None:
    asked, other = never_issued(origin.demo, 4), never_issued(origin.demo, 5)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    path = origin.store_path(asked)
    plant(path, craft(origin, other, now - dt.timedelta(hours=1), now + dt.timedelta(days=1)))
    try:
        assert_error(origin.get(request_for(origin.issuer, asked)), bytes.fromhex("3003 0a01 02"))
    finally:
        path.unlink()
    assert "another serial" in origin.server.wait_event("error")["error"]


def test_stored_objects_failing_verification_are_internal_errors(origin: Origin) -> None:
    """The review's probe12/probe16: a flipped signature bit, `unknown`,
    another issuer's CertID, a future thisUpdate. Each is signed with the
    real responder key (the first before its bit is flipped), so only the
    planted defect is wrong; each passes the structure check."""
    ident = origin.issuer
    now = dt.datetime.now(UTC).replace(microsecond=0)
    serials = [never_issued(origin.demo, n) for n in range(10, 14)]
    day, hour = dt.timedelta(days=1), dt.timedelta(hours=1)
    tbs = [tbs_good(ident, s, now - hour, now + day) for s in serials[:3]]
    integer = der.integer(serials[1])
    tbs[1] = tbs[1].replace(integer + b"\x80\x00", integer + b"\x82\x00")  # good -> unknown [2] NULL
    tbs[2] = tbs[2].replace(ident.name_hash["sha1"], os.urandom(20))  # another issuer's CertID
    tbs.append(tbs_good(ident, serials[3], now + 2 * hour, now + day, produced_at=now + 2 * hour))
    good, unknown, other_issuer, future = sign_tbs(origin, tbs)
    sig = ocsp.load_der_ocsp_response(good).signature
    at = good.rindex(sig) + len(sig) // 2
    flipped = good[:at] + bytes((good[at] ^ 0x01,)) + good[at + 1 :]
    cases = [(flipped, "signature: invalid"), (unknown, "status: unknown"),
             (other_issuer, "certid: issuerNameHash (sha1) does not match issuer"),
             (future, "is in the future")]
    server = Server(origin.config)  # its own error log and rate limit
    try:
        for n, (serial, (body, finding)) in enumerate(zip(serials, cases)):
            assert finding in " ".join(verify_response(body, ident, None, dt.datetime.now(UTC)))
            assert parse_stored(body, "x").certids == {("sha1", serial)}  # the structure is fine
            path = origin.store_path(serial)
            plant(path, body)
            req = request_for(ident, serial)
            try:
                for _ in range(2):  # never cached
                    assert_error(server.request("GET", get_paths(req)[0]), INTERNAL_ERROR)
                if n == 0:  # later lines fall under the one-a-second limit
                    line = server.wait_event("error")
                    assert line["key"] == object_key(ident.id, serial) and line["finding"].startswith(finding)
                    assert line["key"] in line["error"]
                    plant(path, good)  # the failure was not cached: the intact response is served at once
                    assert server.request("GET", get_paths(req)[0])[::2] == (200, good)
            finally:
                path.unlink()
        assert server.metrics()["ocspmint_serve_requests_total{result=error}"] == 2 * len(cases)
    finally:
        assert server.stop() == 0


def test_get_and_post_under_path_prefix(origin: Origin, tmp_path: Path) -> None:
    """The review's probe17: an AIA URL http://host/ocsp; GET is
    {url}/{url-encoding of base64} (RFC 6960 App. A.1)."""
    config = write_config(origin.demo, tmp_path, store=origin.root / "responses",
                          serve=SERVE + '\npath_prefix = "/ocsp"')
    serial = origin.demo.serials["good"][5]
    stored = origin.store_path(serial).read_bytes()
    plain = request_for(origin.issuer, serial)
    n = 0
    while "/" not in base64.b64encode(req := _with_nonce(plain, n.to_bytes(8, "big"))).decode():
        n += 1  # a request whose base64 holds a "/": not just the last path segment
    server = Server(config)
    try:
        for path in (*get_paths(plain), *get_paths(req), "//" + base64.b64encode(req).decode()):
            status, headers, body = server.request("GET", "/ocsp" + path + "?q=1")
            assert (status, body) == (200, stored), path
            assert headers["x-ocsp-key"] == f"{origin.issuer.id}/{serial:040x}"
        assert server.request("HEAD", "/ocsp" + get_paths(plain)[0])[0] == 200
        for path in ("/ocsp", "/ocsp/"):
            reply = server.request("POST", path, {"Content-Type": "application/ocsp-request"}, plain)
            assert reply[::2] == (200, stored), path
        url = f"http://127.0.0.1:{server.port}/ocsp"
        out = openssl_url(origin, serial, url=url)
        assert "Response verify OK" in out and re.search(rf"^0x{serial:x}: good$", out, re.M | re.I), out
        for path in (get_paths(plain)[0], "/ocspx" + get_paths(plain)[0], "/other" + get_paths(plain)[0],
                     "/ocsp", "/ocsp/", "/ocsp/MEIxxx"):
            assert_error(server.request("GET", path), MALFORMED)
        for path in ("/", "/other"):
            assert_error(server.request("POST", path, {"Content-Type": "application/ocsp-request"}, plain), MALFORMED)
        assert server.request("PURGE", "/ocsp" + get_paths(plain)[-1])[::2] == (200, b"purged 1\n")
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("serve", "key"), [
    ('max_age = "-PT2H"', "$.serve.max_age"),
    ('max_age = "PT0S"', "$.serve.max_age"),
    ('cache_ttl = "-PT1M"', "$.serve.cache_ttl"),
    ("cache_bytes = -1", "$.serve.cache_bytes"),
    ('path_prefix = "ocsp"', "$.serve.path_prefix"),
    ('path_prefix = "/ocsp/"', "$.serve.path_prefix"),
    ('path_prefix = "/"', "$.serve.path_prefix"),
    ('path_prefix = "/a//b"', "$.serve.path_prefix"),
    ('path_prefix = "/a?b"', "$.serve.path_prefix"),
    ('purge_from = ["127.0.0.1", "nonsense"]', "$.serve.purge_from[1]"),
])
def test_serve_settings_that_make_no_sense_are_refused(demo: Demo, tmp_path: Path, serve: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write_config(demo, tmp_path, serve=serve))


def test_serve_refuses_a_negative_max_age_naming_the_key(demo: Demo, tmp_path: Path) -> None:
    """The review's negmaxage.toml: it started and sent max-age=-7200."""
    config = write_config(demo, tmp_path, serve='max_age = "-PT2H"')
    p = subprocess.run([str(BIN / "ocspmint"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "$.serve.max_age" in p.stderr, p.stderr
    for serve in ('path_prefix = "/ocsp"\ncache_ttl = "PT0S"\ncache_bytes = 0', 'path_prefix = "/a/b-1.c"', ""):
        cfg = load_config(write_config(demo, tmp_path, serve=serve)).serve
        assert cfg.max_age == dt.timedelta(days=1) and cfg.path_prefix in ("/ocsp", "/a/b-1.c", "")


# --- /metrics and /healthz ----------------------------------------------------


def test_metrics_count_results_and_cache(origin: Origin) -> None:
    server = origin.server
    req = request_for(origin.issuer, origin.demo.serials["good"][0])
    origin.get(req)
    before = server.metrics()
    etag = origin.get(req)[1]["etag"]
    origin.get(req, {"If-None-Match": etag})
    origin.get(request_for(origin.issuer, never_issued(origin.demo, 3)))
    server.request("GET", "/MEIxxx")
    after = server.metrics()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert delta("ocspmint_serve_requests_total{result=ok}") == 1
    assert delta("ocspmint_serve_requests_total{result=not_modified}") == 1
    assert delta("ocspmint_serve_requests_total{result=unauthorized}") == 1
    assert delta("ocspmint_serve_requests_total{result=malformed}") == 1
    assert delta("ocspmint_serve_requests_total{result=error}") == 0
    assert delta("ocspmint_serve_request_seconds_count") == 4
    assert delta("ocspmint_serve_cache_hits_total") == 2
    assert delta("ocspmint_serve_cache_misses_total") == 1
    assert 0 < after["ocspmint_serve_cache_hit_ratio"] <= 1
    assert after["ocspmint_serve_cache_entries"] >= 1 and after["ocspmint_serve_cache_bytes"] > 0


def test_unparsable_http_is_one_json_log_line_and_a_long_get_an_ocsp_answer(origin: Origin) -> None:
    """aiohttp answers what it cannot parse itself (HTTP 400); what it logs
    must be ``http_error`` JSON lines, never a traceback any client can
    trigger. A GET line past aiohttp's default 8,190 bytes is parsed and
    answered malformedRequest like any bad GET."""
    server = origin.server
    mark = len(server.lines)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
            assert s.recv(64).split(b" ")[1] == b"400"
    assert "InvalidHeader" in server.wait_event("http_error")["error"]
    assert_error(server.request("GET", "/" + "A" * 9000), MALFORMED)
    new = server.lines[mark:]
    assert new and all(json.loads(line)["event"] in ("http_error", "error") for line in new), new


def test_a_client_hanging_up_mid_post_is_aborted_not_an_error(origin: Origin) -> None:
    """An alert on result=error must not fire because clients give up:
    a POST cut off inside its body counts as ``aborted``."""
    server = origin.server
    before = server.metrics()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                  b"Content-Length: 100\r\n\r\n0\x01")
        time.sleep(0.2)  # the server is inside the body read when the client leaves
    for _ in range(100):  # the server notices the hang-up in its own time
        after = server.metrics()
        if after.get("ocspmint_serve_requests_total{result=aborted}", 0) > before.get(
                "ocspmint_serve_requests_total{result=aborted}", 0):
            break
        time.sleep(0.05)
    assert after["ocspmint_serve_requests_total{result=aborted}"] == before.get(
        "ocspmint_serve_requests_total{result=aborted}", 0) + 1
    assert after["ocspmint_serve_requests_total{result=error}"] == before["ocspmint_serve_requests_total{result=error}"]


def test_serve_warns_at_start_when_one_certid_hash_will_be_unauthorized(demo: Demo, tmp_path: Path) -> None:
    """With certid_hashes = ["sha1"], every SHA-256 (RFC 9919) request gets
    unauthorized, assigned serial or not: the operator is told at start."""
    (tmp_path / "responses").mkdir()
    server = Server(write_config(demo, tmp_path, hashes='["sha1"]'))
    try:
        warning = server.wait_event("warning")
        assert warning["certid_hashes"] == ["sha1"] and "SHA-256 CertIDs are answered unauthorized" in warning["message"]
    finally:
        assert server.stop() == 0


def test_healthz_follows_the_store_and_serve_refuses_a_missing_store(demo: Demo, tmp_path: Path) -> None:
    store = tmp_path / "responses"
    store.mkdir()
    config = write_config(demo, tmp_path, store=store)
    server = Server(config)
    try:
        assert server.request("GET", "/healthz")[:3:2] == (200, b"ok\n")
        store.rename(tmp_path / "gone")
        assert server.request("GET", "/healthz")[0] == 503
        assert_error(server.request("GET", get_paths(request_for(issuer_identity(load_config(config).issuers[0]),
                                                                     5))[0]), bytes.fromhex("3003 0a01 02"))
        (tmp_path / "gone").rename(store)
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        assert server.stop() == 0
    shutil.rmtree(store)
    p = subprocess.run([str(BIN / "ocspmint"), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "store" in p.stderr and "unusable" in p.stderr


def test_serve_refuses_to_start_when_error_bytes_are_wrong(demo: Demo, tmp_path: Path) -> None:
    config = write_config(demo, tmp_path)
    code = ("import sys, ocspmint.responder as r; r.UNAUTHORIZED = bytes.fromhex('30030a0107'); "
            "from ocspmint.cli import main; "
            f"sys.exit(main(['serve', '--config', {str(config)!r}, '--listen', '127.0.0.1:0']))")
    p = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "refusing to start" in p.stderr and "unauthorized" in p.stderr


# --- request.py: properties and edge cases ------------------------------------

HIGH_BIT_SERIALS = st.integers(1, 20).flatmap(lambda n: st.integers(1 << (8 * n - 1), (1 << (8 * n)) - 1))
SERIALS = st.one_of(st.integers(0, (1 << 160) - 1), HIGH_BIT_SERIALS)
HASH_NAMES = st.sampled_from(["sha1", "sha256"])


@settings(max_examples=300, deadline=None)
@given(serial=SERIALS, hash_name=HASH_NAMES, null_params=st.booleans(), seed=st.binary(min_size=64, max_size=64))
def test_build_parse_round_trip(serial: int, hash_name: str, null_params: bool, seed: bytes) -> None:
    size = 20 if hash_name == "sha1" else 32
    name_hash, key_hash = seed[:size], seed[32 : 32 + size]
    der_request = build_request(name_hash, key_hash, serial, hash_name, null_params)
    expected = [CertIdKey(hash_name, name_hash, key_hash, serial)]
    assert parse_request(der_request) == expected
    for path in get_paths(der_request):
        assert parse_get_path(path) == expected
    theirs = ocsp.load_der_ocsp_request(der_request)  # an independent decoder agrees
    assert (theirs.serial_number, theirs.issuer_name_hash, theirs.issuer_key_hash) == (serial, name_hash, key_hash)
    assert theirs.hash_algorithm.name == hash_name


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_request_error(data: bytes) -> None:
    for parse in (parse_request, lambda d: parse_get_path("/" + base64.b64encode(d).decode())):
        try:
            parse(data)
        except RequestError:
            pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(serial=SERIALS, hash_name=HASH_NAMES, pos=st.integers(min_value=0), value=st.integers(0, 255),
       op=st.sampled_from(["set", "cut", "insert", "delete"]))
def test_mutated_requests_raise_only_request_error(serial: int, hash_name: str, pos: int, value: int, op: str) -> None:
    good = build_request(bytes(DIGEST[hash_name]), bytes(DIGEST[hash_name]), serial, hash_name)
    i = pos % len(good)
    mutated = {"set": good[:i] + bytes((value,)) + good[i + 1 :], "cut": good[:i],
               "insert": good[:i] + bytes((value,)) + good[i:], "delete": good[:i] + good[i + 1 :]}[op]
    try:
        cids = parse_request(mutated)
    except RequestError:
        return
    assert 1 <= len(cids) <= MAX_REQUESTS and all(c.serial >= 0 for c in cids)
    for path in get_paths(mutated):
        try:
            parse_get_path(path[: 1 + (pos % len(path))])
        except RequestError:
            pass


DIGEST = {"sha1": range(20), "sha256": range(32)}
CERT_ID = build_request(bytes(20), bytes(20), 0x80, "sha1")[6:]  # one Request (its CertID at [2:])


def _ocsp_request(*tbs_parts: bytes, signature: bytes = b"") -> bytes:
    return der.tlv(0x30, der.tlv(0x30, b"".join(tbs_parts)) + signature)


def _ext(oid: str, critical: bool = False) -> bytes:
    return der.tlv(0x30, der.tlv(0x06, bytes.fromhex(oid)) + (b"\x01\x01\xff" if critical else b"")
                   + der.tlv(0x04, b"\x04\x02ab"))


NONCE, OTHER = "2b0601050507300102", "2b0601050507300109"


@pytest.mark.parametrize("der_request", [
    _ocsp_request(der.tlv(0xA0, b"\x02\x01\x00"), der.tlv(0x30, CERT_ID)),  # explicit v1
    _ocsp_request(der.tlv(0xA1, der.tlv(0xA4, der.tlv(0x30, b""))), der.tlv(0x30, CERT_ID)),  # requestorName
    _ocsp_request(der.tlv(0x30, CERT_ID), der.tlv(0xA2, der.tlv(0x30, _ext(NONCE, critical=True) + _ext(OTHER)))),
    _ocsp_request(der.tlv(0x30, CERT_ID), signature=der.tlv(0xA0, der.tlv(0x30, b"\x30\x00\x03\x01\x00"))),
    _ocsp_request(der.tlv(0x30, der.tlv(0x30, CERT_ID[2:] + der.tlv(0xA0, der.tlv(0x30, _ext(OTHER)))))),
])
def test_tolerated_request_shapes(der_request: bytes) -> None:
    assert [c.serial for c in parse_request(der_request)] == [0x80]


def _cert_id(alg: bytes, serial: bytes = b"\x02\x02\x00\x80", size: int = 20) -> bytes:
    return der.tlv(0x30, der.tlv(0x30, alg + der.tlv(0x04, bytes(size)) + der.tlv(0x04, bytes(size)) + serial))


SHA1 = "06052b0e03021a"


@pytest.mark.parametrize("der_request", [
    b"",
    _ocsp_request(der.tlv(0x30, CERT_ID)) + b"\x00",  # trailing byte
    _ocsp_request(der.tlv(0x30, b"")),  # no Request
    _ocsp_request(der.tlv(0x30, CERT_ID * (MAX_REQUESTS + 1))),
    _ocsp_request(der.tlv(0xA0, b"\x02\x01\x01"), der.tlv(0x30, CERT_ID)),  # version 2
    _ocsp_request(der.tlv(0x30, CERT_ID), der.tlv(0xA2, der.tlv(0x30, _ext(OTHER, critical=True)))),
    _ocsp_request(der.tlv(0x30, CERT_ID), der.tlv(0xA2, der.tlv(0x30, b""))),  # empty Extensions
    _ocsp_request(der.tlv(0x30, _cert_id(der.tlv(0x30, bytes.fromhex("06082a864886f70d0205") + b"\x05\x00"),
                                         size=16))),  # MD5
    _ocsp_request(der.tlv(0x30, _cert_id(der.tlv(0x30, bytes.fromhex(SHA1) + b"\x04\x00")))),  # params not NULL
    _ocsp_request(der.tlv(0x30, _cert_id(der.tlv(0x30, bytes.fromhex(SHA1)), size=32))),  # wrong digest size
    _ocsp_request(der.tlv(0x30, _cert_id(der.tlv(0x30, bytes.fromhex(SHA1)), b"\x02\x01\x80"))),  # negative
    _ocsp_request(der.tlv(0x30, _cert_id(der.tlv(0x30, bytes.fromhex(SHA1)), b"\x02\x02\x00\x7f"))),  # non-minimal
    _ocsp_request(der.tlv(0x30, _cert_id(der.tlv(0x30, bytes.fromhex(SHA1)), b"\x02\x00"))),  # empty INTEGER
    bytes.fromhex("3081") + bytes((len(CERT_ID) + 4,)) + der.tlv(0x30, der.tlv(0x30, CERT_ID)),  # long-form length < 128
    b"\x30\x80" + der.tlv(0x30, der.tlv(0x30, CERT_ID)) + b"\x00\x00",  # indefinite length
])
def test_refused_request_shapes(der_request: bytes) -> None:
    with pytest.raises(RequestError):
        parse_request(der_request)


def test_openssl_made_requests_parse(demo: Demo, tmp_path: Path) -> None:
    ident = issuer_identity(load_config(demo.config).issuers[0])
    serial = demo.serials["good"][0]
    for extra in (["-no_nonce"], ["-nonce"], ["-sha256", "-nonce"]):
        out = tmp_path / "req.der"
        subprocess.run(["openssl", "ocsp", "-issuer", str(demo.issuing_ca), *extra, "-serial", f"0x{serial:x}",
                        "-reqout", str(out)], check=True, capture_output=True, timeout=30)
        h = "sha256" if "-sha256" in extra else "sha1"
        assert parse_request(out.read_bytes()) == [CertIdKey(h, ident.name_hash[h], ident.key_hash[h], serial)]


def test_get_path_tolerances() -> None:
    serial = next(s for s in range(1, 10**6) if "+" in base64.b64encode(build_request(bytes(20), bytes(20), s, "sha1")).decode())
    req = build_request(bytes(20), bytes(20), serial, "sha1")
    b64 = base64.b64encode(req).decode()
    expected = parse_request(req)
    for path in ("/" + b64.replace("+", " "), "/" + b64.replace("+", "%20"), "///" + b64 + "?x=1",
                 "/" + base64.urlsafe_b64encode(req).decode()):
        assert parse_get_path(path) == expected, path
    for path in ("/", "", "/" + b64[:-5], "/" + b64 + "!", "/%zz" + b64):
        with pytest.raises(RequestError):
            parse_get_path(path)
