"""`ocspmint run` end to end: openssl ca database in, SoftHSM2-signed
responses out, each checked by `openssl ocsp` and pkilint."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess

import pytest

from e2e import gnutls_check, ocspmint, openssl_check, pkilint_findings, response_path, run_json
from ocspmint.demo import build_demo, issue, revoke
from ocspmint.issuer import load_certificate
from ocspmint.model import serial_hex

@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A demo with awkward serials, run once."""
    demo = build_demo(tmp_path_factory.mktemp("run"), extra_serials=[0x01, 0x7F, 0x80, 0xFF00, (1 << 159) | 5, (1 << 152) + 7])
    code, summary = run_json(demo)
    return demo, code, summary


def test_run_publishes_every_unexpired_serial_and_exits_zero(ran):
    demo, code, summary = ran
    unexpired = set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"])
    assert code == 0 and summary["ok"] is True
    assert summary["published"] == summary["verified"] == len(unexpired)
    assert summary["by_kind"]["precertificate"] == len(demo.serials["precert"])
    assert summary["by_status"]["revoked"] == len(demo.serials["revoked"])
    assert summary["expired"] == len(demo.serials["expired"])
    for serial in unexpired:
        assert response_path(demo, serial).is_file(), hex(serial)
    for serial in demo.serials["expired"]:
        assert not response_path(demo, serial).exists()


def test_every_response_passes_openssl_ocsp(ran):
    demo, _, _ = ran
    for serial in set(demo.serials["good"]) | set(demo.serials["precert"]) | set(demo.serials["revoked"]):
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified, view.text
        expected = "revoked" if serial in demo.revoked else "good"
        assert view.status == expected, (hex(serial), view.text)
        if serial in demo.revoked:
            assert view.reason == demo.revoked[serial], view.text
        assert view.next_update, view.text


def test_precertificate_without_final_certificate_gets_a_good_response(ran):
    demo, _, _ = ran
    precert = next(s for s in demo.serials["precert"] if s not in demo.revoked)
    assert openssl_check(demo, response_path(demo, precert), precert).status == "good"


def test_awkward_serials_round_trip(ran):
    demo, _, _ = ran
    for serial in (0x01, 0x7F, 0x80, 0xFF00, (1 << 159) | 5, (1 << 152) + 7):
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified and view.status == "good", (hex(serial), view.text)


def test_pkilint_finds_nothing_in_any_response(ran):
    demo, _, _ = ran
    for serial in set(demo.serials["good"]) | set(demo.serials["precert"]) | set(demo.serials["revoked"]):
        assert pkilint_findings(response_path(demo, serial)) == [], hex(serial)


def test_validity_is_seven_days_inclusive(ran):
    demo, _, _ = ran
    from cryptography.x509 import ocsp

    resp = ocsp.load_der_ocsp_response(response_path(demo, demo.serials["good"][0]).read_bytes())
    assert resp.next_update_utc - resp.this_update_utc + dt.timedelta(seconds=1) == dt.timedelta(days=7)
    assert resp.this_update_utc <= resp.produced_at_utc
    assert [c.subject for c in resp.certificates] == [load_certificate(str(demo.responder_cert)).subject]


def test_second_run_does_only_what_is_due(tmp_path):
    demo = build_demo(tmp_path, certs=4, precerts=2, revoke=1)
    code, first = run_json(demo)
    assert code == 0 and first["published"] > 0
    code, again = run_json(demo)
    assert code == 0 and again["published"] == 0 and again["due"] == {}
    assert again["up_to_date"] == first["published"]

    new = issue(demo, precert=True)
    target = demo.serials["good"][0]
    revoke(demo, target, "keyCompromise")
    code, third = run_json(demo)
    assert code == 0 and third["due"] == {"changed": 1, "new": 1}
    view = openssl_check(demo, response_path(demo, target), target)
    assert view.status == "revoked" and view.reason == "keyCompromise"
    assert openssl_check(demo, response_path(demo, new), new).status == "good"


def test_refresh_point_makes_old_responses_due(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    run_json(demo)
    journal = demo.root / "state" / "journal.sqlite"
    old = int((dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3, minutes=1)).timestamp())
    with sqlite3.connect(journal) as db:
        db.execute("UPDATE published SET this_update = ? WHERE serial IN (SELECT serial FROM published ORDER BY serial LIMIT 2)", (old,))
    code, summary = run_json(demo)
    assert code == 0 and summary["due"] == {"refresh": 2}


def test_a_published_revocation_survives_a_ledger_that_says_good_again(tmp_path):
    """index.txt turns a revoked row back into V (a restored backup, a hand
    edit): the run fails naming the serial, the revoked response stays, and
    once its refresh point passes it is re-signed revoked, never good
    (RFC 5280 §5.3.1, BR 4.9.13). Before, the run published good, exit 0."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=1)
    assert run_json(demo)[0] == 0
    (serial, reason), = demo.revoked.items()
    index = demo.root / "ca" / "index.txt"
    row = next(line for line in index.read_text().splitlines() if int(line.split("\t")[3], 16) == serial)
    f = row.split("\t")
    index.write_text(index.read_text().replace(row, "\t".join(["V", f[1], "", *f[3:]])))
    before = response_path(demo, serial).read_bytes()
    for due in ({}, {"refresh": 1}):
        code, summary = run_json(demo)
        assert code == 1 and summary["ok"] is False and summary["due"] == due and summary["published"] == len(due)
        (failure,) = summary["failures"]
        assert failure["stage"] == "ledger" and int(failure["serial"], 16) == serial
        assert "published revoked" in failure["message"] and "a revocation is final" in failure["message"]
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified and view.status == "revoked" and view.reason == reason, view.text
        with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:  # its refresh point passes
            db.execute("UPDATE published SET this_update = ? WHERE serial = ?",
                       (int((dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=4)).timestamp()), serial_hex(serial)))
    assert response_path(demo, serial).read_bytes() != before  # re-signed, as revoked


def test_both_certid_hashes_in_one_response(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=1)
    text = demo.config.read_text().replace("[signing]", '[response]\ncertid_hashes = ["sha1", "sha256"]\n\n[signing]')
    demo.config.write_text(text)
    code, _ = run_json(demo)
    assert code == 0
    for serial in demo.serials["good"] + demo.serials["precert"]:
        path = response_path(demo, serial)
        for digest in ("sha1", "sha256"):
            view = openssl_check(demo, path, serial, digest)
            assert view.verified and view.status in ("good", "revoked"), (digest, view.text)
        assert pkilint_findings(path) == []
        assert "Verifying OCSP Response: Success." in gnutls_check(demo, path, serial, tmp_path)


@pytest.mark.parametrize("key", ["ec-p384", "rsa-2048"])
def test_other_key_types(tmp_path, key):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=1, responder_key=key)
    code, summary = run_json(demo)
    assert code == 0, summary
    serial = demo.serials["precert"][0]
    view = openssl_check(demo, response_path(demo, serial), serial)
    assert view.verified, view.text
    assert ("ecdsa-with-SHA384" if key == "ec-p384" else "sha256WithRSAEncryption") in view.text


def test_issuing_ca_key_signs_directly(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=1, signer="issuer")
    code, _ = run_json(demo)
    assert code == 0
    from cryptography.x509 import ocsp

    serial = demo.serials["good"][0]
    der = response_path(demo, serial).read_bytes()
    assert ocsp.load_der_ocsp_response(der).certificates == []
    assert openssl_check(demo, response_path(demo, serial), serial).verified


def test_wrong_pin_fails_clearly_without_leaking_it(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=1, revoke=0)
    pin = demo.pin_file.read_text().strip()
    bad = tmp_path / "bad-pin"
    bad.write_text("000000\n")
    cfg = demo.config.read_text().replace('pin_file = "pin.txt"', f'pin_file = "{bad}"')
    demo.config.write_text(cfg)
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 1
    assert "PinIncorrect" in p.stdout + p.stderr
    assert pin not in p.stdout + p.stderr and "000000" not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_config_errors_name_the_key(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    demo.config.write_text(demo.config.read_text().replace("workers = 2", 'workers = "two"'))
    p = ocspmint(demo, "run")
    assert p.returncode == 2 and "$.signing.workers" in p.stderr and str(demo.config) in p.stderr
    demo.config.write_text(demo.config.read_text().replace('workers = "two"', "workers = 2\nvalidity = \"P11D\""))
    p = ocspmint(demo, "run")
    assert p.returncode == 2 and "validity" in p.stderr


def _replace_sources(demo, sources: str) -> None:
    head, _, _ = demo.config.read_text().partition("[[sources]]")
    demo.config.write_text(head + sources)


def test_ingested_sqlite_ledger_gives_the_same_responses(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=2, revoke=2)
    p = ocspmint(demo, "ingest", "--into", str(demo.root / "ledger.sqlite"))
    assert p.returncode == 0, p.stdout + p.stderr
    _replace_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')
    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == 5 and summary["by_kind"]["precertificate"] == 2
    for serial, reason in demo.revoked.items():
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.status == "revoked" and view.reason == reason


def test_certificate_folder_with_crl(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=2, revoke=2)
    crl = demo.root / "ca" / "issuing-ca.crl"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(crl), "-batch"],
                   check=True, capture_output=True, cwd=demo.root / "ca")
    _replace_sources(demo, f'[[sources]]\ntype = "certdir"\npath = "ca/newcerts"\ncrls = ["{crl}"]\n')
    code, summary = run_json(demo)
    assert code == 0, summary["failures"]
    assert summary["by_status"] == {"good": 5 - len(demo.revoked), "revoked": len(demo.revoked)}
    assert summary["expired"] == 1
    for serial in demo.revoked:
        assert openssl_check(demo, response_path(demo, serial), serial).status == "revoked"
