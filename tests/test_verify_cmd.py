"""`ocspmint verify` (verify_cmd.py) on a real demo (openssl CA, SoftHSM2
token): responses whose serial the ledger cannot vouch for, store objects
that cannot be read, stores that hold nothing, and the JSON shape."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from e2e import ocspmint, response_path, run_json
from ocspmint.demo import Demo, build_demo, revoke
from ocspmint.issuer import key_bits
from ocspmint.ledger.sqlite import write_entries
from ocspmint.model import Kind, LedgerEntry, Status, serial_hex, utc_now


def published(tmp_path: Path, **kw: int) -> Demo:
    demo = build_demo(tmp_path, **{"certs": 2, "precerts": 0, "revoke": 0, **kw})
    code, summary = run_json(demo)
    assert code == 0, summary
    return demo


def verify_json(demo: Demo, *args: str) -> tuple[int, dict]:
    p = ocspmint(demo, "verify", "--json", *args)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.returncode, json.loads(p.stdout)


def test_a_response_for_a_serial_whose_ledger_row_is_in_error_is_a_finding(tmp_path: Path) -> None:
    """Before, verify kept the last good-looking row and said OK for a stored
    `good` whose serial a later index line revokes (a duplicate the run
    refuses to publish from), exit 0: a possibly wrong status called right."""
    demo = published(tmp_path)
    serial = demo.serials["good"][0]
    lines = demo.index.read_text().splitlines()
    (row,) = [line for line in lines if line.split("\t")[3] == format(serial, "X").zfill(32)]
    f = row.split("\t")
    f[0], f[2] = "R", (utc_now() - dt.timedelta(hours=1)).strftime("%y%m%d%H%M%SZ") + ",keyCompromise"
    demo.index.write_text("\n".join([*lines, "\t".join(f)]) + "\n")
    code, report = verify_json(demo)
    assert code == 1 and report["with_findings"] == 1, report
    (bad,) = [r for r in report["responses"] if r["findings"]]
    assert bad["serial"] == serial_hex(serial)
    assert any("ledger state is unknown" in x and f"{demo.index}:{len(lines) + 1}" in x and "duplicate serial" in x
               for x in bad["findings"]), bad
    # the same through a second source stating the serial revoked
    demo.index.write_text("\n".join(lines) + "\n")
    assert verify_json(demo)[0] == 0
    db = demo.root / "second.sqlite"
    write_entries(str(db), [LedgerEntry("issuing-ca", serial, Kind.CERTIFICATE, utc_now() + dt.timedelta(days=60),
                                        Status.REVOKED, utc_now() - dt.timedelta(hours=1), None, "second")])
    with demo.config.open("a") as fh:
        fh.write('\n[[sources]]\ntype = "sqlite"\npath = "second.sqlite"\n')
    code, report = verify_json(demo)
    (bad,) = [r for r in report["responses"] if r["findings"]]
    assert code == 1 and bad["serial"] == serial_hex(serial)
    assert any("stated differently" in x for x in bad["findings"]), bad


def test_a_store_object_that_cannot_be_read_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    """Before: a Python traceback (OSError from the store walk)."""
    demo = published(tmp_path)
    store = demo.root / "responses"
    os.symlink("loop", store / "loop")
    p = ocspmint(demo, "verify")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "loop: FAIL store: cannot read the object: Too many levels of symbolic links" in p.stdout, p.stdout
    assert "3 responses checked, 1 with findings" in p.stdout


def test_a_store_folder_that_does_not_exist_or_holds_nothing_is_said_so(tmp_path: Path) -> None:
    """Before: "0 responses checked, 0 with findings", exit 1, and no word
    of why (a mistyped --store URL looked like a clean, empty result)."""
    demo = published(tmp_path)
    missing = tmp_path / "nowhere"
    p = ocspmint(demo, "verify", "--store", f"file:{missing}")
    assert p.returncode == 2 and p.stderr.strip() == f"ocspmint: {missing}: store folder does not exist", p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = ocspmint(demo, "verify", "--store", f"file:{empty}")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"file:{empty}: the store holds no object: nothing was verified" in p.stderr, p.stderr


def _root_certid_response(demo: Demo, serial: int) -> bytes:
    """A response signed by the issuing CA whose CertID names the root CA."""
    ca = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes())
    root = x509.load_pem_x509_certificate(demo.root_ca.read_bytes())
    key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    now = utc_now()

    def sha1(data: bytes) -> bytes:
        h = hashes.Hash(hashes.SHA1())
        h.update(data)
        return h.finalize()

    b = ocsp.OCSPResponseBuilder().add_response_by_hash(
        sha1(root.subject.public_bytes()), sha1(key_bits(root)), serial, hashes.SHA1(), ocsp.OCSPCertStatus.GOOD,
        now, now + dt.timedelta(days=7) - dt.timedelta(seconds=1), None, None)
    b = b.responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def test_json_shape_for_bad_files_names_the_serial_when_it_is_known(tmp_path: Path) -> None:
    """Every record has path, issuer, serial, status, findings, response; a
    response for another issuer names its serial (before: empty, and
    ``response`` {} where a good file had the decoded summary)."""
    demo = published(tmp_path)
    serial = demo.serials["good"][0]
    files = {"empty": b"", "one-byte": b"\x30", "truncated": response_path(demo, serial).read_bytes()[:40],
             "unauthorized": bytes.fromhex("30030a0106"), "other-issuer": _root_certid_response(demo, serial)}
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / f"{name}.der")
        paths[-1].write_bytes(data)
    code, report = verify_json(demo, *map(str, paths), str(response_path(demo, serial)))
    assert code == 1 and report["checked"] == 6 and report["with_findings"] == 5
    by_name = {Path(r["path"]).stem: r for r in report["responses"]}
    for r in report["responses"]:
        assert set(r) == {"path", "issuer", "serial", "status", "findings", "response"}, r
        assert r["response"].get("responseStatus"), r
    assert by_name["empty"]["findings"] == ["malformed: empty body"]
    assert by_name["one-byte"]["findings"][0].startswith("malformed: 1 bytes")
    assert by_name["unauthorized"]["findings"] == ["status: unauthorized"]
    other = by_name["other-issuer"]
    assert other["serial"] == serial_hex(serial) and other["issuer"] == ""
    assert other["findings"] == ["issuer: issuerKeyHash matches no configured issuer"]
    ok = by_name[format(serial, "040x")]
    assert ok["findings"] == [] and ok["status"] == "good" and ok["issuer"] == "issuing-ca"


def test_responses_signed_before_the_validity_setting_changed_still_verify(tmp_path: Path) -> None:
    """Published with the default validity (7 days − 1 s), then [response]
    validity set to 4 days: the stored responses stay right until re-signed
    (`ocspmint audit` agrees). Before, verify made a finding of every one
    ("nextUpdate - thisUpdate is 6 days, 23:59:59, configured 4 days"),
    exit 1; the BR 4.9.9 bounds are still checked."""
    demo = published(tmp_path)
    text = demo.config.read_text()
    demo.config.write_text(text.replace("[[issuers]]", '[response]\nvalidity = "P4D"\n\n[[issuers]]', 1))
    code, report = verify_json(demo)
    assert code == 0 and report["checked"] == len(demo.serials["good"]) and report["with_findings"] == 0, report


def test_ledger_rows_that_name_no_serial_fail_verify_as_they_fail_run_and_audit(tmp_path: Path) -> None:
    """Before, verify printed a hint and exited 0 (JSON ok true) while `run`
    and `audit` exit 1 for the same ledger: a garbled row may be the
    revocation of a serial whose stored `good` verify called right."""
    demo = published(tmp_path)
    lines = demo.index.read_text().splitlines()
    row = lines[0].split("\t")  # its revocation, with the serial field garbled
    row[0], row[3] = "R", "NOT-A-SERIAL"
    row[2] = (utc_now() - dt.timedelta(hours=1)).strftime("%y%m%d%H%M%SZ") + ",keyCompromise"
    demo.index.write_text("\n".join([*lines, "\t".join(row)]) + "\n")
    where = f"{demo.index}:{len(lines) + 1}"

    p = ocspmint(demo, "verify")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr[-3000:]
    out = p.stdout.splitlines()
    assert any(line.startswith(f"ledger: {where}: ") for line in out), p.stdout
    assert "1 ledger rows in error name no serial" in p.stdout and out[-1] == "2 responses checked, 0 with findings"
    code, report = verify_json(demo)
    assert (code, report["ok"], report["with_findings"], report["ledger_errors_without_serial"]) == (1, False, 0, 1)
    (error,) = report["ledger_errors"]
    assert error.startswith(f"{where}: "), error

    code, summary = run_json(demo)
    assert code == 1 and [f["source"] for f in summary["failures"]] == [where], summary["failures"]
    assert ocspmint(demo, "audit", "--quiet").returncode == 1


def held_by_a_crl(demo: Demo, serial: int) -> str:
    """A second source, the certificate folder with a CRL putting ``serial``
    on hold (a row in error naming it: BR 4.9.13 forbids certificateHold);
    the index never heard of the hold. What the error says."""
    index = demo.index.read_text()
    revoke(demo, serial, "certificateHold")
    crl = demo.root / "crl.pem"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(crl)],
                   cwd=demo.openssl_cnf.parent, check=True, capture_output=True)
    demo.index.write_text(index)
    with demo.config.open("a") as fh:
        fh.write(f'\n[[sources]]\ntype = "certdir"\npath = "ca/newcerts"\ncrls = ["{crl}"]\n')
    return "certificateHold"


def stated_revoked_by_a_second_source(demo: Demo, serial: int) -> str:
    """A second source stating ``serial`` revoked, the index good. What the
    error says."""
    write_entries(str(demo.root / "second.sqlite"), [LedgerEntry(
        "issuing-ca", serial, Kind.CERTIFICATE, utc_now() + dt.timedelta(days=60), Status.REVOKED,
        utc_now() - dt.timedelta(hours=1), None, "second")])
    with demo.config.open("a") as fh:
        fh.write('\n[[sources]]\ntype = "sqlite"\npath = "second.sqlite"\n')
    return "stated differently"


@pytest.mark.parametrize("in_error", [held_by_a_crl, stated_revoked_by_a_second_source], ids=["hold", "conflict"])
def test_a_row_in_error_naming_a_serial_never_published_fails_verify(tmp_path: Path, in_error) -> None:
    """Before, verify exited 0 (JSON ok true): the serial the row names has
    no stored response, so no finding, though its ledger state is unknown
    and `run` fails on the same ledger. Now the row is a ledger error
    naming the serial, exit 1, as a row naming no serial."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    serial = demo.serials["good"][0]
    why = in_error(demo, serial)
    demo.config.write_text('on_error = "quarantine"\n' + demo.config.read_text())
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 1, summary
    assert [f["serial"] for f in summary["failures"]] == [serial_hex(serial)], summary["failures"]
    assert not response_path(demo, serial).exists()

    code, report = verify_json(demo)
    assert (code, report["ok"], report["checked"], report["with_findings"]) == (1, False, 1, 0), report
    assert (report["ledger_errors_without_serial"], report["ledger_errors_without_response"]) == (0, 1), report
    (error,) = report["ledger_errors"]
    assert why in error and f"issuer issuing-ca serial {serial_hex(serial)}: no response for it was checked" in error
    p = ocspmint(demo, "verify")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr[-3000:]
    assert f"ledger: {error}" in p.stdout.splitlines(), p.stdout
    assert p.stdout.splitlines()[-1] == "1 responses checked, 0 with findings"
