"""`ocspmint audit` end to end: a demo CA run once, then its store damaged
in every way an audit class names; the audit must put each serial in
exactly that class, from the store and over HTTP (`ocspmint serve` and a
misbehaving HTTP server), and `--fix` must leave a store that audits clean.

Hand-made responses are signed with the demo issuing CA's own software key
(the demo with ``signer="issuer"`` signs with that key in the token); their
thisUpdate is never before the CA certificate's notBefore (a few seconds
before the test), so an expired response has a short interval and a stale
one is shown by auditing with a 2-second refresh_after.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from cdn import free_port, serve
from e2e import ocspmint, response_path, run_json
from ocspmint import der
from ocspmint.audit_check import CLASSES
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, revoke
from ocspmint.encoder import UNAUTHORIZED, ResponseTemplate, Times
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.ledger import openssl_hex
from ocspmint.model import Kind, LedgerEntry, Status, utc_now
from ocspmint.store import PutItem, object_key
from ocspmint.verifier import FINDING_CLASSES, Expectation, finding_class, verify_response

UNASSIGNED = 0xDEADBEEF


def audit(demo: Demo, *args: str, config: Path | None = None) -> tuple[int, dict]:
    p = ocspmint(demo, "audit", "--json", "--quiet", *args, config=config)
    assert p.returncode == 2 or p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout) if p.stdout else {}


def classes(report: dict, source: str = "store") -> dict[str, str]:
    """serial hex → class of every finding from ``source``; a serial must
    appear once per source (exactly one class)."""
    out: dict[str, str] = {}
    for f in report["findings"]:
        if f["source"] == source:
            assert f["serial"] not in out, f
            out[f["serial"]] = f["class"]
    return out


def ident_of(demo: Demo, config: Path | None = None) -> IssuerIdentity:
    return next(iter(load_issuers(load_config(config or demo.config)).values()))


def ca_signed(demo: Demo, serial: int, this: dt.datetime, nxt: dt.datetime, this_der: bytes | None = None) -> bytes:
    """A good response for ``serial`` with these times, signed by the demo's
    issuing CA key; ``this_der`` replaces the thisUpdate GeneralizedTime."""
    ident = ident_of(demo)
    template = ResponseTemplate(ident, ("sha1",))
    produced, tail = template.time_fields(Times(max(this, utc_now()), this, nxt))
    if this_der is not None:
        tail = this_der + tail[17:]
    entry = LedgerEntry(ident.name, serial, Kind.CERTIFICATE, nxt + dt.timedelta(days=90), Status.GOOD)
    tbs = template.tbs(entry, (produced, tail))
    key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    return template.response(tbs, key.sign(tbs, ec.ECDSA(hashes.SHA256())))


def built(demo: Demo, serial: int, status: ocsp.OCSPCertStatus, key_path: Path, signer_cert: Path) -> bytes:
    """A response made by pyca's OCSPResponseBuilder, signed with ``key_path``."""
    cert = x509.load_pem_x509_certificate(demo.cert_path(serial).read_bytes())
    ca = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes())
    now = utc_now()
    b = ocsp.OCSPResponseBuilder().add_response(cert, ca, hashes.SHA1(), status, now, now + dt.timedelta(days=7) - dt.timedelta(seconds=1), None, None)
    b = b.responder_id(ocsp.OCSPResponderEncoding.HASH, x509.load_pem_x509_certificate(signer_cert.read_bytes()))
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def flip_signature_bit(data: bytes) -> bytes:
    sig = ocsp.load_der_ocsp_response(data).signature
    out = bytearray(data)
    out[data.index(sig) + len(sig) // 2] ^= 0x01
    return bytes(out)


def unexpired(demo: Demo) -> set[int]:
    return set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"])


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CA-signed demo run once, audited clean, then damaged; the audits."""
    demo = build_demo(tmp_path_factory.mktemp("audit"), certs=16, precerts=2, revoke=2, signer="issuer")
    code, summary = run_json(demo)
    assert code == 0, summary
    published = utc_now()
    out: dict = {"demo": demo}
    out["clean"] = audit(demo)
    time.sleep(max(0.0, (published + dt.timedelta(seconds=2) - dt.datetime.now(dt.UTC)).total_seconds()))
    stale = demo.root / "stale.toml"  # the demo config with a 2 s refresh point
    stale.write_text(demo.config.read_text() + '\n[response]\nbackdate = "PT0S"\nrefresh_after = "PT2S"\n')
    out["stale"] = audit(demo, config=stale)

    g = out["good"] = list(demo.serials["good"])  # revoke() below changes the demo's list
    precert = next(s for s in demo.serials["precert"] if s not in demo.revoked)

    def path(serial: int) -> Path:
        return response_path(demo, serial)

    now = utc_now()
    ca_from = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes()).not_valid_before_utc
    expect = {
        g[0]: "missing", g[1]: "malformed", g[2]: "malformed", g[3]: "malformed", g[4]: "malformed",
        g[5]: "unauthorized", g[6]: "wrong_serial", g[7]: "bad_signature", g[8]: "wrong_signer",
        g[9]: "wrong_status", g[10]: "unknown", g[11]: "expired", g[12]: "time_format", precert: "validity_too_long",
    }
    original = {s: path(s).read_bytes() for s in expect}
    path(g[0]).unlink()
    path(g[1]).write_bytes(b"")
    path(g[2]).write_bytes(b"\x00")  # the 1-byte default file (Mozilla bug 1577014)
    path(g[3]).write_bytes(b"<html><body>404 Not Found</body></html>\n")
    path(g[4]).write_bytes(original[g[4]][: len(original[g[4]]) // 2])
    path(g[5]).write_bytes(UNAUTHORIZED)
    path(g[6]).write_bytes(original[g[7]])
    path(g[7]).write_bytes(flip_signature_bit(original[g[7]]))
    path(g[8]).write_bytes(built(demo, g[8], ocsp.OCSPCertStatus.GOOD, demo.root / "ca/root.key", demo.root_ca))
    revoke(demo, g[9], "keyCompromise")
    path(g[10]).write_bytes(built(demo, g[10], ocsp.OCSPCertStatus.UNKNOWN, demo.issuing_key, demo.issuing_ca))
    path(g[11]).write_bytes(ca_signed(demo, g[11], ca_from, now - dt.timedelta(seconds=1)))
    fraction = der.tlv(0x18, now.strftime("%Y%m%d%H%M%S").encode() + b".5Z")  # Mozilla bug 1999850
    path(g[12]).write_bytes(ca_signed(demo, g[12], now, now + dt.timedelta(days=7) - dt.timedelta(seconds=1), fraction))
    path(precert).write_bytes(ca_signed(demo, precert, now, now + dt.timedelta(days=9)))
    (expired,) = demo.serials["expired"]
    path(expired).parent.mkdir(parents=True, exist_ok=True)
    path(expired).write_bytes(original[g[7]])
    path(UNASSIGNED).parent.mkdir(parents=True, exist_ok=True)
    path(UNASSIGNED).write_bytes(ca_signed(demo, UNASSIGNED, now, now + dt.timedelta(days=7) - dt.timedelta(seconds=1)))
    stray = demo.root / "responses" / "zz" / "not-a-response"
    stray.parent.mkdir()
    stray.write_bytes(b"left by someone")
    out.update(expect=expect, expired=expired, damaged=audit(demo))
    return out


def test_clean_store_is_all_ok(damaged: dict) -> None:
    code, report = damaged["clean"]
    assert code == 0 and report["ok"] is True and report["findings"] == []
    assert report["counts"] == {"store": {"ok": {"issuing-ca": len(unexpired(damaged["demo"]))}}}


def test_each_damage_gets_its_class(damaged: dict) -> None:
    code, report = damaged["damaged"]
    assert code == 1 and report["ok"] is False
    got = classes(report)
    want = {format(s, "040x"): c for s, c in damaged["expect"].items()}
    want[format(damaged["expired"], "040x")] = "expired_served"
    want[format(UNASSIGNED, "040x")] = "unassigned"
    want[""] = "unassigned"  # the stray file, whose key names no issuer or serial
    assert got == want


def test_counts_by_class_and_issuer(damaged: dict) -> None:
    _, report = damaged["damaged"]
    counts = report["counts"]["store"]
    n = len(unexpired(damaged["demo"]))
    assert counts["malformed"] == {"issuing-ca": 4}
    assert counts["unassigned"] == {"issuing-ca": 1, "": 1}
    assert counts["expired_served"] == {"issuing-ca": 1}
    assert counts["ok"] == {"issuing-ca": n - len(damaged["expect"])}
    assert report["checked"] == {"store": n}
    assert report["finding_count"] == len(report["findings"]) == len(damaged["expect"]) + 3


def test_findings_say_why_most_severe_first(damaged: dict) -> None:
    _, report = damaged["damaged"]
    by_serial = {f["serial"]: f for f in report["findings"]}
    assert report["findings"][0]["class"] == "unassigned"
    assert "GOOD for a serial the ledger does not know" in by_serial[format(UNASSIGNED, "040x")]["detail"]
    assert "zz/not-a-response" in by_serial[""]["detail"]
    g = damaged["good"]
    assert by_serial[format(g[2], "040x")]["detail"].startswith("malformed: 1 bytes")
    assert by_serial[format(g[9], "040x")]["detail"] == "status: good, ledger says revoked"
    # several findings apply; the wrong signer explains the invalid signature
    assert "signature: invalid" in by_serial[format(g[8], "040x")]["detail"]
    # an expired response also has an interval under BR 4.9.9's 8 hours here
    assert "validity interval" in by_serial[format(g[11], "040x")]["detail"]
    assert ".5Z" in by_serial[format(g[12], "040x")]["detail"]


def test_past_the_refresh_point_is_stale(damaged: dict) -> None:
    code, report = damaged["stale"]
    n = len(unexpired(damaged["demo"]))
    assert code == 1
    assert report["counts"] == {"store": {"stale": {"issuing-ca": n}}}
    assert "refresh point" in report["findings"][0]["detail"] and "BR 4.9.9" in report["findings"][0]["detail"]


def test_selection_by_issuer_and_serial_list(damaged: dict, tmp_path: Path) -> None:
    demo, g = damaged["demo"], damaged["good"]
    listed = tmp_path / "serials.txt"
    listed.write_text(f"0x{g[0]:x}\n{g[13]:X}\n\n# not assigned:\n{UNASSIGNED:x}\n0x123456\n")
    code, report = audit(demo, "--issuer", "issuing-ca", "--serials", str(listed))
    assert code == 1
    assert classes(report) == {format(g[0], "040x"): "missing", format(UNASSIGNED, "040x"): "unassigned"}
    assert report["checked"] == {"store": 2} and report["probed"] == {"store": 2}
    listed.write_text(f"{g[0]:x}\nnot-hex\n")
    p = ocspmint(demo, "audit", "--serials", str(listed))
    assert p.returncode == 2 and f"{listed}:2" in p.stderr
    p = ocspmint(demo, "audit", "--issuer", "nobody")
    assert p.returncode == 2 and "nobody" in p.stderr


def test_text_table(damaged: dict) -> None:
    p = ocspmint(damaged["demo"], "audit", "--quiet")
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert lines[1].split() == ["class", "(no", "issuer)", "issuing-ca", "total"]
    table = {line.split()[0]: line.split()[1:] for line in lines[2 : lines.index("findings, most severe first:")]}
    assert table["malformed"] == ["0", "4", "4"] and table["unassigned"] == ["1", "1", "2"]
    assert list(table)[0] == "unassigned" and list(table)[-1] == "ok"
    assert lines[-1].startswith(f"{len(damaged['expect']) + 3} findings")


def test_audit_selection_for_reissue(damaged: dict) -> None:
    """`ocspmint reissue` ends with audit_selection over its selection."""
    from ocspmint.audit import audit_selection

    g = damaged["good"]
    picked = {g[0], g[13]}
    result = audit_selection(load_config(damaged["demo"].config), lambda e: e.serial in picked)
    assert [(f["serial"], f["class"]) for f in result["findings"]] == [(format(g[0], "040x"), "missing")]
    assert result["counts"] == {"store": {"missing": {"issuing-ca": 1}, "ok": {"issuing-ca": 1}}}
    assert result["ok"] is False and "missing" in result["text"]


def test_verifier_findings_map_to_classes(damaged: dict) -> None:
    """The verifier's own words for defects the store damage does not make."""
    demo = damaged["demo"]
    ident = ident_of(demo)
    now = utc_now()
    entry = LedgerEntry(ident.name, UNASSIGNED, Kind.CERTIFICATE, now + dt.timedelta(days=90), Status.GOOD)
    # a time-zone error (IdenTrust 2024): thisUpdate and producedAt two hours ahead
    future = ca_signed(demo, UNASSIGNED, now + dt.timedelta(hours=2), now + dt.timedelta(days=7))
    findings = verify_response(future, ident, Expectation(entry, ("sha1",)), now)
    assert findings and {finding_class(f) for f in findings} == {"time_format"}, findings
    both = verify_response(ca_signed(demo, UNASSIGNED, now, now + dt.timedelta(days=6)), ident,
                           Expectation(entry, ("sha1", "sha256")), now)
    assert [finding_class(f) for f in both] == ["wrong_serial"]
    assert finding_class("status: internalError") == "error_response"
    # every class the verifier can give has its place in the audit's order (error_response is mapped per source)
    assert set(FINDING_CLASSES) - {"error_response"} <= set(CLASSES)


# --- over HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, str, int, int]]:
    """A demo run once, one object deleted and one certificate issued after
    the run; `ocspmint serve` on its store. Yields (demo, base URL, the
    deleted serial, the new serial)."""
    from ocspmint.demo import issue

    root = tmp_path_factory.mktemp("audit-http")
    demo = build_demo(root, certs=5, precerts=1, revoke=1)
    assert run_json(demo)[0] == 0
    deleted = demo.serials["good"][0]
    response_path(demo, deleted).unlink()
    new = issue(demo)
    with serve(demo.config, root, free_port(), demo.env()) as base:
        yield demo, base, deleted, new


def test_http_audit_through_the_origin(served: tuple[Demo, str, int, int]) -> None:
    demo, base, deleted, new = served
    code, report = audit(demo, "--store", "--url", base)
    assert code == 1
    assert classes(report, "store") == {format(deleted, "040x"): "missing", format(new, "040x"): "missing"}
    # the origin answers unauthorized for what it has no response for (RFC 5019 §2.2.3)
    assert classes(report, "http") == {format(deleted, "040x"): "unauthorized", format(new, "040x"): "unauthorized"}
    assert report["counts"]["http"]["ok"] == {"issuing-ca": len(unexpired(demo)) - 2}
    assert report["sources"] == {"store": f"file:{demo.root}/responses", "http": base}


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """Answers an OCSP GET by its serial from ``answers``: (status, body)."""

    answers: dict[int, tuple[int, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        request = ocsp.load_der_ocsp_request(base64.b64decode(urllib.parse.unquote(self.path[1:])))
        status, body = self.answers.get(request.serial_number, (404, b""))
        self.send_response(status)
        self.send_header("Content-Type", "application/ocsp-response")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_http_audit_of_a_misbehaving_server(served: tuple[Demo, str, int, int], tmp_path: Path) -> None:
    demo = served[0]
    (_, one_byte, not_found, fine, _), (empty,), (error,) = (demo.serials[t] for t in ("good", "precert", "revoked"))
    _Misbehaving.answers = {one_byte: (200, b"\x00"), empty: (200, b""), error: (503, b"busy"),
                            fine: (200, response_path(demo, fine).read_bytes())}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    listed = tmp_path / "serials.txt"
    listed.write_text("".join(f"{s:x}\n" for s in (one_byte, not_found, empty, error, fine)))
    try:
        code, report = audit(demo, "--url", f"http://127.0.0.1:{server.server_port}", "--serials", str(listed))
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1
    got = classes(report, "http")
    assert got == {format(one_byte, "040x"): "malformed", format(not_found, "040x"): "missing",
                   format(empty, "040x"): "malformed", format(error, "040x"): "http_error",
                   format(fine, "040x"): "http_error"}
    # the right bytes without RFC 5019 §6 headers (ETag, Cache-Control...) are still a serving error
    assert "headers: ETag" in next(f["detail"] for f in report["findings"] if f["serial"] == format(fine, "040x"))
    assert "store" not in report["sources"]


# --- --fix -------------------------------------------------------------------


def test_fix_resigns_deletes_and_reaudits_clean(tmp_path: Path) -> None:
    demo = build_demo(tmp_path, certs=6, precerts=1, revoke=1)
    assert run_json(demo)[0] == 0
    g = list(demo.serials["good"])
    response_path(demo, g[0]).unlink()
    response_path(demo, g[1]).write_bytes(b"\x00")
    response_path(demo, g[2]).write_bytes(flip_signature_bit(response_path(demo, g[2]).read_bytes()))
    revoke(demo, g[3], "superseded")
    (expired,) = demo.serials["expired"]
    for serial in (UNASSIGNED, expired):
        response_path(demo, serial).parent.mkdir(parents=True, exist_ok=True)
        response_path(demo, serial).write_bytes(response_path(demo, g[4]).read_bytes())

    code, report = audit(demo, "--fix")
    assert code == 0, report
    assert len(classes(report["audit"])) == 6
    assert report["fix"]["resigned"] == 4 and report["fix"]["deleted"] == 2 and report["fix"]["run"]["ok"] is True
    assert report["reaudit"]["ok"] is True and report["reaudit"]["findings"] == []
    assert report["reaudit"]["checked"] == {"store": 4} and report["reaudit"]["probed"] == {"store": 2}
    assert not response_path(demo, UNASSIGNED).exists() and not response_path(demo, expired).exists()
    code, after = audit(demo)
    assert code == 0 and after["findings"] == []


def test_fix_refuses_another_store(damaged: dict, tmp_path: Path) -> None:
    p = ocspmint(damaged["demo"], "audit", "--fix", "--store", f"file:{tmp_path}")
    assert p.returncode == 2 and "--fix" in p.stderr


def test_fix_of_the_damaged_store_leaves_only_what_it_must_not_touch(damaged: dict) -> None:
    """Everything is re-signed or deleted but the stray key naming no
    issuer, which --fix reports and keeps: exit 1."""
    demo = damaged["demo"]
    code, report = audit(demo, "--fix")
    assert code == 1 and report["ok"] is False
    assert report["fix"]["resigned"] == len(damaged["expect"]) and report["fix"]["deleted"] == 2
    assert report["fix"]["left"] == 1 and report["fix"]["run"]["ok"] is True
    (left,) = report["reaudit"]["findings"]
    assert left["class"] == "unassigned" and left["detail"].startswith("zz/not-a-response: ")
    assert not response_path(demo, UNASSIGNED).exists() and (demo.root / "responses/zz/not-a-response").exists()


# --- S3 ----------------------------------------------------------------------


def test_s3_store_audit_and_fix(seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same audit and --fix against S3 (SeaweedFS): fetch, listing, delete."""
    from ocspmint.s3store import S3Store

    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    prefix = "audit-" + os.urandom(4).hex()
    config = demo.root / "s3.toml"
    config.write_text(demo.config.read_text().replace('url = "file:responses"\n', f'url = "s3://{seaweed.bucket}/{prefix}"\n'
                                                      f'endpoint = "{seaweed.endpoint}"\nregion = "{seaweed.region}"\n'))
    env = seaweed.env()
    assert run_json(demo, env=env, config=config)[0] == 0
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = S3Store(f"s3://{seaweed.bucket}/{prefix}", load_config(config).store)
    ident, gone = ident_of(demo), demo.serials["good"][0]
    try:
        store.delete(object_key(ident.id, gone))
        copy = store.get(object_key(ident.id, demo.serials["good"][1]))
        assert copy is not None
        now = utc_now()
        assert store.submit([PutItem(object_key(ident.id, UNASSIGNED), copy, now, now)]).result(60) == [None]
        p = ocspmint(demo, "audit", "--json", "--quiet", config=config, env=env)
        assert p.returncode == 1, p.stderr
        assert classes(json.loads(p.stdout)) == {format(gone, "040x"): "missing", format(UNASSIGNED, "040x"): "unassigned"}
        p = ocspmint(demo, "audit", "--fix", "--json", "--quiet", config=config, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert json.loads(p.stdout)["fix"]["deleted"] == 1
        assert store.get(object_key(ident.id, UNASSIGNED)) is None and store.get(object_key(ident.id, gone)) is not None
    finally:
        store.close()


# --- ledger rows in error, sources that disagree -----------------------------


def _index_line(demo: Demo, serial: int) -> str:
    return next(line for line in demo.index.read_text().splitlines() if line.split("\t")[3] == openssl_hex(serial))


def _retired_with_a_duplicate(demo: Demo, serial: int) -> None:
    """``serial``'s certificate file archived (its index line is then an
    error row) and the line repeated as revoked: the repeat is a ledger
    error naming the serial (LedgerError.key: "duplicate serial"), so the
    ledger has no entry for it, only an error that says it is assigned."""
    line = _index_line(demo, serial).split("\t")
    line[0], line[2] = "R", f"{utc_now() - dt.timedelta(minutes=1):%y%m%d%H%M%SZ},keyCompromise"
    archive = demo.root / "archive"
    archive.mkdir(exist_ok=True)
    demo.cert_path(serial).rename(archive / demo.cert_path(serial).name)
    with demo.index.open("a") as fh:
        fh.write("\t".join(line) + "\n")


def test_a_serial_a_ledger_error_names_is_assigned_never_unassigned_nor_deleted(tmp_path: Path) -> None:
    """BR 4.9.9 / MRSP §5.4: an error row naming a serial says it was
    issued, in a state the ledger cannot tell; its response is reported
    (class ledger_error), not called unassigned, and --fix neither deletes
    nor re-signs it."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    assert run_json(demo)[0] == 0
    serial = demo.serials["good"][0]
    _retired_with_a_duplicate(demo, serial)
    served = response_path(demo, serial).read_bytes()
    key = format(serial, "040x")

    code, report = audit(demo)
    assert code == 1 and report["ok"] is False and report["ledger_error_count"] >= 1
    assert classes(report) == {key: "ledger_error"}
    (finding,) = report["findings"]
    assert finding["detail"].startswith(f"ledger row in error, state unknown ({demo.index}:")
    assert f"serves good for serial {key}" in finding["detail"]
    assert "GOOD for a serial the ledger does not know" not in finding["detail"]
    assert report["counts"]["store"]["ledger_error"] == {"issuing-ca": 1}

    listed = tmp_path / "serials.txt"  # listed: the ledger does know it
    listed.write_text(f"{serial:x}\n")
    code, report = audit(demo, "--serials", str(listed))
    assert code == 1 and classes(report) == {key: "ledger_error"}

    code, report = audit(demo, "--fix")
    assert code == 1 and report["ok"] is False
    assert report["fix"]["deleted"] == 0 and report["fix"]["resigned"] == 0 and report["fix"]["in_error"] == 1
    assert classes(report["reaudit"]) == {key: "ledger_error"}
    assert response_path(demo, serial).read_bytes() == served


def test_a_duplicate_row_is_a_ledger_error_not_the_first_rows_statement(tmp_path: Path) -> None:
    """index.txt states a serial twice (good, then revoked): `run` publishes
    neither; the audit must not judge the served GOOD by the first line."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    assert run_json(demo)[0] == 0
    serial = demo.serials["good"][1]
    line = _index_line(demo, serial).split("\t")
    line[0], line[2] = "R", f"{utc_now() - dt.timedelta(minutes=1):%y%m%d%H%M%SZ},keyCompromise"
    with demo.index.open("a") as fh:
        fh.write("\t".join(line) + "\n")
    code, report = audit(demo)
    assert code == 1 and classes(report) == {format(serial, "040x"): "ledger_error"}
    assert report["checked"] == {"store": len(unexpired(demo))}


def test_fix_keeps_the_responses_of_issued_serials_whose_rows_are_in_error(tmp_path: Path) -> None:
    """A certificate file archived, and a certificateHold revocation: each
    index row is in error. Whether the reader names their serials
    (LedgerError.key: ledger_error) or not (unassigned, with a note), --fix
    must not delete those responses: the origin would answer unauthorized
    for issued certificates (BR 4.9.9, MRSP §5.4)."""
    demo = build_demo(tmp_path, certs=4, precerts=0, revoke=0)
    assert run_json(demo)[0] == 0
    archived, held = demo.serials["good"][:2]
    archive = demo.root / "archive"
    archive.mkdir()
    demo.cert_path(archived).rename(archive / demo.cert_path(archived).name)
    revoke(demo, held, "certificateHold")
    kept = {s: response_path(demo, s).read_bytes() for s in (archived, held)}

    code, report = audit(demo)
    assert code == 1 and report["ledger_error_count"] == 2
    got = classes(report)
    assert set(got) == {format(s, "040x") for s in kept} and set(got.values()) <= {"ledger_error", "unassigned"}
    for f in report["findings"]:
        if f["class"] == "unassigned":  # the row names no serial: the audit cannot tell it is this one
            assert "2 rows in error that name no serial" in f["detail"], f

    code, report = audit(demo, "--fix")
    assert code == 1 and report["fix"]["deleted"] == 0
    assert report["fix"]["kept"] + report["fix"]["in_error"] == 2
    assert {s: response_path(demo, s).read_bytes() for s in kept} == kept


def test_fix_keeps_unknown_serials_while_a_ledger_row_in_error_names_none(tmp_path: Path) -> None:
    """A GOOD object for a serial the ledger does not know is unassigned;
    but while an index line is in error without naming its serial (here its
    serial field is mangled) that line may be this serial's: the finding
    says so and --fix keeps the object."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    assert run_json(demo)[0] == 0
    line = _index_line(demo, demo.serials["good"][0]).split("\t")
    line[3] = "not-a-serial"
    with demo.index.open("a") as fh:
        fh.write("\t".join(line) + "\n")
    unknown = response_path(demo, UNASSIGNED)
    unknown.parent.mkdir(parents=True, exist_ok=True)
    unknown.write_bytes(response_path(demo, demo.serials["good"][1]).read_bytes())
    code, report = audit(demo)
    assert code == 1 and classes(report) == {format(UNASSIGNED, "040x"): "unassigned"}
    assert report["findings"][0]["detail"].endswith(
        "the ledger has 1 rows in error that name no serial: it may be one of them (--fix does not delete it)")
    code, report = audit(demo, "--fix")
    assert code == 1 and report["fix"]["kept"] == 1 and report["fix"]["deleted"] == 0 and unknown.exists()
    assert classes(report["reaudit"]) == {format(UNASSIGNED, "040x"): "unassigned"}
    p = ocspmint(demo, "audit", "--fix", "--quiet")
    assert p.returncode == 1 and "1 objects of serials the ledger does not know kept" in p.stdout


@pytest.mark.parametrize("index_first", [True, False])
def test_two_sources_stating_a_serial_differently(tmp_path: Path, index_first: bool) -> None:
    """index.txt says revoked, a certificate folder with a CRL made before
    that revocation says good: `run` publishes neither statement
    (pipeline.ledger_entries); the audit must report the serial as a ledger
    error whatever the order of the sources, never pick one."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    assert run_json(demo)[0] == 0
    crl = demo.root / "ca" / "old.crl"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(crl), "-batch"],
                   check=True, capture_output=True, cwd=demo.root / "ca")
    serial = demo.serials["good"][0]
    revoke(demo, serial, "keyCompromise")
    head, _, index_source = demo.config.read_text().partition("[[sources]]")
    index_source = "[[sources]]" + index_source
    certdir = f'\n[[sources]]\ntype = "certdir"\npath = "ca/newcerts"\ncrls = ["{crl}"]\n'
    demo.config.write_text(head + (index_source + certdir if index_first else certdir + "\n" + index_source))
    key = format(serial, "040x")

    code, summary = run_json(demo)  # the pipeline's view, which the audit must share
    assert code == 1 and [f["serial"] for f in summary["failures"]] == [key]

    code, report = audit(demo)
    assert code == 1 and report["ok"] is False
    assert classes(report) == {key: "ledger_error"}
    assert report["ledger_error_count"] == 1 and "stated differently" in report["ledger_errors"][0]
    assert report["checked"] == {"store": len(unexpired(demo))}

    code, report = audit(demo, "--fix")
    assert code == 1 and report["fix"]["resigned"] == 0 and report["fix"]["in_error"] == 1
    assert classes(report["reaudit"]) == {key: "ledger_error"}
