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
import subprocess
import threading
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from e2e import BIN, openssl_check, run_json
from ocspmint import der
from ocspmint.config import load_config
from ocspmint.demo import Demo
from ocspmint.issuer import IssuerIdentity, issuer_identity, load_certificate
from ocspmint.request import (
    MAX_REQUESTS, CertIdKey, RequestError, build_request, get_paths, parse_get_path, parse_request, request_for,
)
from ocspmint.store import object_key

UNAUTHORIZED = bytes.fromhex("3003 0a01 06")
MALFORMED = bytes.fromhex("3003 0a01 01")
MAX_AGE = 7200  # [serve] max_age of the test config, seconds
UTC = dt.timezone.utc


# --- a served copy of the session demo ----------------------------------------


def _q(s: str | Path) -> str:
    return json.dumps(str(s))  # a TOML basic string


def write_config(demo: Demo, root: Path, *, hashes: str = '["sha1", "sha256"]', store: Path | None = None) -> Path:
    """A config for ``demo``'s CA and token whose store and journal live in
    ``root`` (the session demo's own folder is left untouched)."""
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
cache_ttl = "PT1H"
max_age = "PT2H"
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

    def __init__(self, config: Path, listen: str = "127.0.0.1:0") -> None:
        self.proc = subprocess.Popen([str(BIN / "ocspmint"), "serve", "--config", str(config), "--listen", listen],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


def craft(demo: Demo, serial: int, this_update: dt.datetime, next_update: dt.datetime) -> bytes:
    """A `good` response signed by the issuing CA's software key (SHA-1
    CertID only), for planting in the store under the running server."""
    ca = load_certificate(str(demo.issuing_ca))
    key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    ident = issuer_identity(load_config(demo.config).issuers[0])
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        ident.name_hash["sha1"], ident.key_hash["sha1"], serial, hashes.SHA1(), ocsp.OCSPCertStatus.GOOD,
        this_update, next_update, None, None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def plant(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def openssl_url(origin: Origin, serial: int, *extra: str) -> str:
    cmd = ["openssl", "ocsp", "-url", f"http://127.0.0.1:{origin.server.port}", "-issuer", str(origin.demo.issuing_ca),
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
    planted = craft(origin.demo, serial, now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
    plant(origin.store_path(serial), planted)
    assert origin.get(req)[2] == planted
    # the planted response has only a SHA-1 SingleResponse: a SHA-256 CertID can't be answered from it
    assert_error(origin.get(request_for(origin.issuer, serial, "sha256")), UNAUTHORIZED)


def test_cached_bytes_until_ban_or_purge(origin: Origin) -> None:
    demo, server = origin.demo, origin.server
    serial = demo.serials["good"][7]
    req = request_for(origin.issuer, serial)
    original = origin.store_path(serial).read_bytes()
    assert origin.get(req)[2] == original  # now cached
    now = dt.datetime.now(UTC).replace(microsecond=0)
    versions = [craft(demo, serial, now - dt.timedelta(hours=h), now + dt.timedelta(days=1)) for h in (1, 2, 3)]
    key = {"X-OCSP-Key": f"{origin.issuer.id}/{serial:040x}"}

    plant(origin.store_path(serial), versions[0])
    assert origin.get(req)[2] == original
    assert server.request("BAN", "/", key, source="127.0.0.2")[0] == 405  # not in purge_from
    assert origin.get(req)[2] == original
    status, _, text = server.request("BAN", "/", key)
    assert (status, text) == (200, b"purged 1\n")
    assert origin.get(req)[2] == versions[0]

    plant(origin.store_path(serial), versions[1])
    assert origin.get(req, encoded=True)[2] == versions[0]
    assert server.request("PURGE", get_paths(req)[-1])[0] == 200
    assert origin.get(req)[2] == versions[1]

    plant(origin.store_path(serial), versions[2])
    assert origin.get(req)[2] == versions[1]
    assert server.request("BAN", "/", {"X-OCSP-Issuer": origin.issuer.id})[0] == 200
    assert origin.get(req)[2] == versions[2]

    assert server.request("BAN", "/", {"X-OCSP-Key": "nonsense"})[0] == 400
    assert server.request("PURGE", "/MEIxxx")[0] == 400
    plant(origin.store_path(serial), original)
    assert server.request("BAN", "/", key)[0] == 200
    assert origin.get(req)[2] == original


def test_response_past_next_update_is_served_uncached(origin: Origin) -> None:
    demo = origin.demo
    serial = demo.serials["expired"][0]
    now = dt.datetime.now(UTC).replace(microsecond=0)
    stale = craft(demo, serial, now - dt.timedelta(days=8), now - dt.timedelta(days=1))
    path = origin.store_path(serial)
    before = origin.server.metrics()
    plant(path, stale)
    try:
        status, headers, body = origin.get(request_for(origin.issuer, serial))
    finally:
        path.unlink()
    assert (status, body) == (200, stale)
    assert headers["cache-control"] == "max-age=0, no-cache"
    assert http_time(headers["expires"]) == now - dt.timedelta(days=1)
    after = origin.server.metrics()
    assert after["ocspmint_serve_requests_total{result=expired}"] == before["ocspmint_serve_requests_total{result=expired}"] + 1
    assert_error(origin.get(request_for(origin.issuer, serial)), UNAUTHORIZED)  # gone from the store: not cached


def test_mis_keyed_stored_response_is_an_internal_error(origin: Origin) -> None:
    asked, other = never_issued(origin.demo, 4), never_issued(origin.demo, 5)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    path = origin.store_path(asked)
    plant(path, craft(origin.demo, other, now - dt.timedelta(hours=1), now + dt.timedelta(days=1)))
    try:
        assert_error(origin.get(request_for(origin.issuer, asked)), bytes.fromhex("3003 0a01 02"))
    finally:
        path.unlink()
    assert "another serial" in origin.server.wait_event("error")["error"]


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
