"""Bad input to `ocspmint run`: malformed files in a certificate folder,
serials stated twice, ledger rows and sources for an unknown issuer, and
delegated responder certificates that are unusable (not issued by the CA,
or off the BR 7.1.2.8 profile: EKU, id-pkix-ocsp-nocheck, keyUsage), an
issuing CA signing itself without keyUsage digitalSignature (BR 7.1.2.10.7),
and signer certificates that expire before nextUpdate or are not valid yet.

What each reader reports row by row is in test_ledger.py; bad index.txt
lines, a missing certificate file and a token key that does not match the
signer certificate are in test_faults.py. Here: what a run does with them,
end to end. A bad row is named (file, line or ledger key) in the summary,
the run exits 1 (2 when the config or an issuer is unusable), and with
on_error = "quarantine" every other serial is still published.

Signing starts while the ledger pass still reads, so the long-pass tests
check that what the pass finds at its end (a conflict, a bad row, a Ctrl-C)
still decides what is published, and that the Runner holds at most
MAX_HELD signed responses meanwhile.

Tests marked xfail(strict=True) state wanted behaviour that the current
code lacks; each reason says what goes wrong today.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509 import ocsp as x509_ocsp

from e2e import BIN, ocspmint, openssl_check, response_path, run_json
from faultkit import SOFTHSM, assert_journal_matches_store, file_objects, journal_rows, set_signing, use_module, verify_clean
from ocspmint.demo import Demo, build_demo
from ocspmint.ledger import openssl_hex
from ocspmint.ledger.sqlite import write_entries
from ocspmint import pipeline
from ocspmint.config import load_config
from ocspmint.encoder import ResponseTemplate
from ocspmint.issuer import IdentityError, load_issuers, signed_by
from ocspmint.model import Kind, LedgerEntry, Status, serial_hex, utc_now
from ocspmint.runner import Runner, batch_times
from ocspmint.signer import IN_FLIGHT_PER_WORKER

UTC = dt.timezone.utc


def set_sources(demo: Demo, sources: str, on_error: str = "stop") -> None:
    """Replace the demo's [[sources]] with ``sources`` (TOML) and set on_error."""
    head, _, _ = demo.config.read_text().partition("[[sources]]")
    head = "".join(line for line in head.splitlines(keepends=True) if not line.startswith("on_error = "))
    demo.config.write_text(f'on_error = "{on_error}"\n' + head + sources)


def verify_ledger_errors(demo: Demo) -> tuple[int, list[str]]:
    """`ocspmint verify --json` over a store whose every response is right
    while ledger rows in error name serials no response was checked for: it
    exits 1; returns how many responses it checked and where those rows are
    (the ``file:line`` or ``db:issuer/serial`` each error starts with)."""
    p = ocspmint(demo, "verify", "--json")
    report = json.loads(p.stdout)
    assert (p.returncode, report["ok"], report["with_findings"]) == (1, False, 0), p.stdout[-3000:] + p.stderr[-2000:]
    assert report["ledger_errors_without_response"] == len(report["ledger_errors"]), report["ledger_errors"]
    return report["checked"], sorted(e.split(": ")[0] for e in report["ledger_errors"])


def index_source() -> str:
    return '[[sources]]\ntype = "openssl-index"\npath = "ca/index.txt"\ncerts_dir = "ca/newcerts"\nissuer = "issuing-ca"\n'


def unexpired(demo: Demo) -> set[int]:
    return set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"])


def gen_crl(demo: Demo) -> Path:
    crl = demo.root / "ca" / "issuing-ca.crl"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(crl), "-batch"],
                   check=True, capture_output=True, cwd=demo.root / "ca")
    return crl


def sign_with_issuing_ca(demo: Demo, serial: int, subject: str) -> x509.Certificate:
    """Another leaf certificate from the demo's issuing CA key (same issuer
    name and key as `openssl ca` uses), with ``serial``."""
    ca = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes())
    ca_key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    now = utc_now()
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca.subject).public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(serial).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


# --------------------------------------------------------------- malformed certificates in a certdir


def bad_certdir(demo: Demo) -> tuple[Path, dict[str, str]]:
    """certs/: the demo's certificates plus bad files; returns the folder and
    file name → words its ledger failure must contain."""
    certs = demo.root / "certs"
    shutil.copytree(demo.certs_dir, certs)
    pem = demo.cert_path(demo.serials["good"][0]).read_bytes()
    (certs / "truncated.pem").write_bytes(pem[: len(pem) // 2])
    (certs / "empty.der").write_bytes(b"")
    (certs / "junk.der").write_bytes(b"\x30\x82\x01\x00" + b"\x00" * 64)
    shutil.copy(demo.root / "ca" / "leaf.key", certs / "leaf.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    now = utc_now()
    stranger = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (certs / "stranger.pem").write_bytes(stranger.public_bytes(serialization.Encoding.PEM))
    twin = sign_with_issuing_ca(demo, demo.serials["good"][1], "twin.example")
    (certs / "twin.pem").write_bytes(twin.public_bytes(serialization.Encoding.PEM))
    return certs, {
        "truncated.pem": "PEM CERTIFICATE block without its END line",
        "empty.der": "not a DER certificate",
        "junk.der": "not a DER certificate",
        "leaf.pem": "PEM file without a CERTIFICATE block",
        "stranger.pem": "issuer 'CN=Some Other CA' is not a configured issuer",
        "twin.pem": f"different certificates share serial {openssl_hex(demo.serials['good'][1])}",
    }


def test_malformed_certificates_are_named_and_quarantine_publishes_the_rest(tmp_path):
    demo = build_demo(tmp_path, certs=4, precerts=2, revoke=1)
    certs, expect = bad_certdir(demo)
    set_sources(demo, f'[[sources]]\ntype = "certdir"\npath = "certs"\ncrls = ["{gen_crl(demo)}"]\n', "quarantine")
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    failed = [line for line in p.stdout.splitlines() if line.startswith("  FAILED ")]
    assert len(failed) == len(expect), p.stdout
    clash = demo.serials["good"][1]  # two certificates claim it: neither is trusted
    for name, words in expect.items():  # the twin's row is under the first file of its serial, naming both
        [line] = [line for line in failed if str(certs / name) in line]
        named = f"issuing-ca serial {clash:#x} " if name == "twin.pem" else ""  # no source may publish it
        assert line.startswith(f"  FAILED [ledger] {named}({certs}/") and words in line, line
    assert not response_path(demo, clash).exists()
    published = unexpired(demo) - {clash}
    for serial in published:
        expected = "revoked" if serial in demo.revoked else "good"
        assert openssl_check(demo, response_path(demo, serial), serial).status == expected, hex(serial)
    assert len(assert_journal_matches_store(demo, file_objects(demo).get)) == len(published)


def test_malformed_certificate_stops_the_run_by_default(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    certs, _ = bad_certdir(demo)
    set_sources(demo, '[[sources]]\ntype = "certdir"\npath = "certs"\n')
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0
    [failure] = summary["failures"]
    assert failure["stage"] == "ledger" and failure["source"].startswith(str(certs))
    assert file_objects(demo) == {} and journal_rows(demo) == {}


# --------------------------------------------------------------- serials stated twice


def twice_in_index(demo: Demo) -> tuple[int, str]:
    """Append a revoked copy of a valid index.txt row; (serial, words of its report)."""
    lines = demo.index.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("V"))
    f = lines[first].split("\t")
    demo.index.write_text("\n".join([*lines, "\t".join(["R", f[1], "250101000000Z,keyCompromise", *f[3:]])]) + "\n")
    return int(f[3], 16), f"duplicate serial {f[3]} (first on line {first + 1})"


def test_duplicate_index_row_stops_the_run_by_default(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    _, words = twice_in_index(demo)
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0
    [failure] = summary["failures"]
    assert failure["message"] == words and failure["source"] == f"{demo.index}:{len(demo.index.read_text().splitlines())}"
    assert file_objects(demo) == {} and journal_rows(demo) == {}


@pytest.mark.parametrize("where", ["index.txt twice", "index.txt and certdir"])
def test_serial_stated_twice_differently_is_never_published_good(tmp_path, where):
    demo = build_demo(tmp_path, certs=4, precerts=1, revoke=1)
    if where == "index.txt twice":
        serial, _ = twice_in_index(demo)
        set_sources(demo, index_source(), "quarantine")
    else:  # the certificate folder, without a CRL, states every revoked serial as good
        serial = next(iter(demo.revoked))
        set_sources(demo, index_source() + '[[sources]]\ntype = "certdir"\npath = "ca/newcerts"\n', "quarantine")
    code, summary = run_json(demo)
    assert openssl_check(demo, response_path(demo, serial), serial).status in ("missing", "revoked")
    assert code == 1 and any(f["serial"] == serial_hex(serial) or f"{serial:X}" in f["message"].upper()
                             for f in summary["failures"])


def test_serial_in_two_sources_is_signed_once(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    set_sources(demo, index_source() + '[[sources]]\ntype = "certdir"\npath = "ca/newcerts"\n')
    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == len(unexpired(demo)), summary["published"]


# --------------------------------------------------------------- unknown issuers


def test_ledger_rows_of_an_unknown_issuer_are_named_and_the_rest_published(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    later = utc_now() + dt.timedelta(days=60)
    ours = [LedgerEntry("issuing-ca", 0x1000 + i, Kind.CERTIFICATE, later, Status.GOOD, source="synthetic") for i in range(5)]
    strays = [LedgerEntry("retired-ca", 0x2000 + i, Kind.CERTIFICATE, later, Status.GOOD, source="synthetic") for i in range(2)]
    db = demo.root / "ledger.sqlite"
    write_entries(str(db), ours + strays)
    set_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n', "quarantine")
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 5
    assert sorted(f["source"] for f in summary["failures"]) == [f"{db}:retired-ca/{serial_hex(e.serial)}" for e in strays]
    assert all(f["stage"] == "ledger" and "issuer 'retired-ca' is not configured" in f["message"] for f in summary["failures"])
    # every stored response is right, but the rows of the unknown issuer fail verify as they fail run
    assert verify_ledger_errors(demo) == (5, [f"{db}:retired-ca/{serial_hex(e.serial)}" for e in strays])
    set_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')  # on_error = "stop"
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0 and len(journal_rows(demo)) == 5


def test_source_of_an_unknown_issuer_is_a_config_error(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    set_sources(demo, index_source() + index_source().replace('issuer = "issuing-ca"', 'issuer = "retired-ca"'), "quarantine")
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"ocspmint: {demo.config}: $.sources[1].issuer: no issuer named 'retired-ca'"
    assert file_objects(demo) == {}


# --------------------------------------------------------------- a long ledger pass: what it finds late, holding, Ctrl-C


def long_ledger(demo: Demo, name: str, live: list[int], expired: int, *extra: LedgerEntry) -> None:
    """A SQLite ledger ``name``: ``live`` serials good and unexpired, then
    ``expired`` expired rows (read by the plan, never signed), then ``extra``."""
    now = utc_now()
    later, before = now + dt.timedelta(days=60), now - dt.timedelta(days=1)
    write_entries(str(demo.root / name), [
        *(LedgerEntry("issuing-ca", s, Kind.CERTIFICATE, later, Status.GOOD, source="synthetic") for s in live),
        *(LedgerEntry("issuing-ca", 0x6000_0000 + i, Kind.CERTIFICATE, before, Status.GOOD, source="synthetic")
          for i in range(expired)),
        *extra])


# The runs below sign what the ledger pass finds due while it reads on: with
# 150,000 expired rows after the live ones the pass lasts ~0.6 s, and the
# first batches come back signed well before it ends (the workers log in in
# ~0.3 s). What the pass finds at its end must still decide what is published.

def conflict_at_the_end(demo: Demo, live: list[int]) -> None:
    """Sources: a long ledger (``live``, then 150,000 expired rows) and, read
    after it, a second one stating ``live[0]`` revoked (``on_error =
    "quarantine"``)."""
    long_ledger(demo, "ledger.sqlite", live, 150_000)
    write_entries(str(demo.root / "late.sqlite"), [LedgerEntry(
        "issuing-ca", live[0], Kind.CERTIFICATE, utc_now() + dt.timedelta(days=60), Status.REVOKED,
        utc_now() - dt.timedelta(hours=1), None, "synthetic")])
    set_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n'
                      '[[sources]]\ntype = "sqlite"\npath = "late.sqlite"\n', "quarantine")


def test_a_conflict_found_at_the_end_of_a_long_pass_is_not_published(tmp_path):
    """A serial signed early in the pass, and stated differently by a second
    source read after it, is in neither the store nor the journal."""
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    live = [0x7000 + i for i in range(2000)]
    conflict_at_the_end(demo, live)
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == len(live) - 1
    [failure] = summary["failures"]
    assert failure["serial"] == serial_hex(live[0]) and "stated differently" in failure["message"]
    assert set(journal_rows(demo)) == {("issuing-ca", s) for s in live[1:]}
    assert not response_path(demo, live[0]).exists() and len(file_objects(demo)) == len(live) - 1
    assert verify_ledger_errors(demo) == (len(live) - 1, [f"{demo.root / 'late.sqlite'}:issuing-ca/{serial_hex(live[0])}"])


def test_a_conflicting_serial_whose_batch_fails_signing_is_reported_once(tmp_path, shim):
    """Every signature fails (the HSM), and one serial is also stated
    differently by a second source read at the end of the pass: that serial
    is one failure (stage ledger), the others one each (stage sign)."""
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    live = [0x7000 + i for i in range(40)]
    conflict_at_the_end(demo, live)
    set_signing(demo, workers=1, batch_size=8, retries=2)
    use_module(demo, shim)
    code, summary = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_FROM": "2"})  # 1: the key probe
    assert code == 1 and summary["published"] == 0
    stages = {(f["serial"], f["stage"]) for f in summary["failures"]}
    assert len(summary["failures"]) == len(stages) == len(live), sorted(stages)[:4]
    assert (serial_hex(live[0]), "ledger") in stages
    assert {serial for serial, stage in stages if stage == "sign"} == {serial_hex(s) for s in live[1:]}
    assert file_objects(demo) == {} and journal_rows(demo) == {}


def test_a_bad_row_at_the_end_of_a_long_pass_stops_the_run_with_nothing_published(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    stray = LedgerEntry("retired-ca", 0x9000, Kind.CERTIFICATE, utc_now() + dt.timedelta(days=60), Status.GOOD,
                        source="synthetic")
    long_ledger(demo, "ledger.sqlite", [0x7000 + i for i in range(2000)], 150_000, stray)
    set_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')  # on_error = "stop"
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0
    [failure] = summary["failures"]
    assert failure["stage"] == "ledger" and "issuer 'retired-ca' is not configured" in failure["message"]
    assert file_objects(demo) == {} and journal_rows(demo) == {}


def test_signing_waits_for_a_long_pass_when_the_runner_holds_its_limit(tmp_path, monkeypatch):
    """The Runner holds at most MAX_HELD signed responses (memory) while the
    pass runs: signing pauses there and resumes when the pass is complete,
    and every serial is published once."""
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    live = [0x7000 + i for i in range(3000)]
    long_ledger(demo, "ledger.sqlite", live, 150_000)
    set_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')
    set_signing(demo, workers=1, batch_size=16)
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    monkeypatch.setattr(Runner, "MAX_HELD", 64)
    most: list[int] = [0]
    signed = Runner.signed

    def counting(self: Runner, reply: object) -> None:
        signed(self, reply)
        most[0] = max(most[0], sum(len(r.responses) for r in self.held))

    monkeypatch.setattr(Runner, "signed", counting)
    summary = pipeline.run(load_config(demo.config), show_progress=False)
    assert summary.ok and summary.published == len(live), summary.failures[:3]
    assert 64 <= most[0] <= 64 + IN_FLIGHT_PER_WORKER * 16  # the limit, and what was in flight when it was reached
    assert {s for _, s in assert_journal_matches_store(demo, file_objects(demo).get)} == set(live)


def test_a_run_interrupted_during_a_long_pass_publishes_nothing_and_exits_cleanly(tmp_path):
    """Ctrl-C (SIGINT) at several moments while the pass is still reading
    and the signer workers (6, spawned one after another) start or sign:
    each time exit 130, nothing published, and no traceback on stderr, from
    the run (the pool is closed only once its start has ended; the ledger's
    connections close in the pass's own thread) or from a worker whose pipe
    broke as the run went."""
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    long_ledger(demo, "ledger.sqlite", [0x7000 + i for i in range(500)], 400_000)
    set_sources(demo, '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')
    set_signing(demo, workers=6)
    journal = demo.root / "state" / "journal.sqlite"  # made as the run opens its journal, just before the pass
    for delay in (0.1, 0.4, 0.7, 1.0):
        shutil.rmtree(demo.root / "state", ignore_errors=True)
        p = subprocess.Popen([str(BIN / "ocspmint"), "run", "--quiet", "--json", "--config", str(demo.config)],
                             env=demo.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not journal.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # the pass of 400,500 rows takes over a second
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, (delay, err)
        assert file_objects(demo) == {} and journal_rows(demo) == {}, delay


# --------------------------------------------------------------- delegated responder certificates


DS_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
CA_USAGES = x509.KeyUsage(True, False, False, False, False, True, True, False, False)  # digitalSignature, keyCertSign, cRLSign


def new_responder(demo: Demo, *, eku: list[x509.ObjectIdentifier] | None = None, lifetime: dt.timedelta = dt.timedelta(days=30),
                  by_root: bool = False, nocheck: str = "non-critical", ku: x509.KeyUsage | None = DS_ONLY,
                  ku_critical: bool = True, not_before: dt.timedelta | None = None, ca: bool = False,
                  aki: str = "keyid", aki_critical: bool = False,
                  extra: tuple[x509.ExtensionType, ...] = ()) -> x509.Certificate:
    """Replace ca/responder.pem by a certificate for the same token key, issued
    by the issuing CA (or the root), with ``eku`` (None: no EKU extension),
    id-pkix-ocsp-nocheck ``nocheck`` ("non-critical", "critical", "absent" or
    "malformed": an OCTET STRING where NULL belongs),
    keyUsage ``ku`` (None: absent) critical or not, and notAfter = now +
    ``lifetime``; notBefore now + ``not_before``, by default an hour before
    now or notAfter; basicConstraints cA ``ca``; authorityKeyIdentifier
    ``aki`` ("keyid": the issuer's key identifier, "absent", "keyid+issuer-serial"
    adding authorityCertIssuer and authorityCertSerialNumber, "issuer-serial"
    without keyIdentifier, "other-keyid": another key's) critical or not;
    ``extra`` extensions (non-critical).
    With the defaults but ``eku`` it has the BR 7.1.2.8 profile."""
    ca_path, key_path = (demo.root_ca, demo.root / "ca" / "root.key") if by_root else (demo.issuing_ca, demo.issuing_key)
    issuer = x509.load_pem_x509_certificate(ca_path.read_bytes())
    old = x509.load_pem_x509_certificate(demo.responder_cert.read_bytes())
    now = utc_now()
    start = now + not_before if not_before is not None else now + min(lifetime, dt.timedelta(0)) - dt.timedelta(hours=1)
    b = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(issuer.subject).public_key(old.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(start)
         .not_valid_after(now + lifetime)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if aki != "absent":
        b = b.add_extension(authority_key_id(aki, issuer), critical=aki_critical)
    for extension in extra:
        b = b.add_extension(extension, critical=False)
    if ku is not None:
        b = b.add_extension(ku, critical=ku_critical)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if nocheck == "malformed":
        b = b.add_extension(x509.UnrecognizedExtension(ExtensionOID.OCSP_NO_CHECK, b"\x04\x00"), critical=False)
    elif nocheck != "absent":
        b = b.add_extension(x509.OCSPNoCheck(), critical=nocheck == "critical")
    cert = b.sign(serialization.load_pem_private_key(key_path.read_bytes(), None), hashes.SHA256())
    demo.responder_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def authority_key_id(form: str, issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """An authorityKeyIdentifier of ``form`` (see new_responder) for a
    certificate ``issuer`` issues."""
    keyid = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest
    names, serial = [x509.DirectoryName(issuer.issuer)], issuer.serial_number
    if form == "keyid+issuer-serial":
        return x509.AuthorityKeyIdentifier(keyid, names, serial)
    if form == "issuer-serial":
        return x509.AuthorityKeyIdentifier(None, names, serial)
    if form == "other-keyid":
        return x509.AuthorityKeyIdentifier(hashlib.sha1(keyid).digest(), None, None)
    return x509.AuthorityKeyIdentifier(keyid, None, None)


def new_issuing_ca(demo: Demo, *, ku: x509.KeyUsage = CA_USAGES, not_before: dt.timedelta | None = None) -> x509.Certificate:
    """Replace ca/issuing-ca.pem by another certificate from the root for the
    same name and key (the leaves and the responder certificate still chain
    to it) with keyUsage ``ku`` and notBefore now + ``not_before`` (default:
    the old notBefore)."""
    root = x509.load_pem_x509_certificate(demo.root_ca.read_bytes())
    root_key = serialization.load_pem_private_key((demo.root / "ca" / "root.key").read_bytes(), None)
    old = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes())
    cert = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(root.subject).public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(old.not_valid_before_utc if not_before is None else utc_now() + not_before)
            .not_valid_after(old.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ku, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(old.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))  # type: ignore[arg-type]
    demo.issuing_ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def assert_refused(demo: Demo, line: str) -> None:
    """Every command that loads the issuers exits 2 with the one line ``line``
    on stderr (``refresh`` and ``serve`` would otherwise keep running)."""
    for command in ("run", "verify", "refresh", "serve"):
        p = ocspmint(demo, command, timeout=60)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (command, p.stderr[-2000:])
        assert p.stderr.startswith(f"ocspmint: {line}") and p.stderr.count("\n") == 1, (command, p.stderr)
    assert file_objects(demo) == {} and journal_rows(demo) == {}


OCSP, SERVER = ExtendedKeyUsageOID.OCSP_SIGNING, ExtendedKeyUsageOID.SERVER_AUTH
NO_DS = x509.KeyUsage(False, True, False, False, False, False, False, False, False)  # nonRepudiation only
DS_KE = x509.KeyUsage(True, False, True, False, False, False, False, False, False)  # digitalSignature, keyEncipherment
SAN = x509.SubjectAlternativeName([x509.DNSName("ocsp.example.com")])
CRL_DP = x509.CRLDistributionPoints([x509.DistributionPoint([x509.UniformResourceIdentifier("http://crl.example.com/ca.crl")],
                                                            None, None, None)])
POLICIES = x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier("2.23.140.1.2.1"), None)])
NAME_CONSTRAINTS = x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None)


@pytest.mark.parametrize("kw,words", [
    ({"eku": None}, "responder certificate lacks EKU id-kp-OCSPSigning (RFC 6960 §4.2.2.2)"),
    ({"eku": [SERVER]}, "responder certificate lacks EKU id-kp-OCSPSigning (RFC 6960 §4.2.2.2)"),
    ({"eku": [OCSP], "by_root": True}, "responder certificate is not issued by its issuer"),
    ({"eku": [OCSP, SERVER]},
     "responder certificate has EKU serverAuth besides id-kp-OCSPSigning (BR 7.1.2.8.5: id-kp-OCSPSigning only)"),
    ({"eku": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, OCSP]},
     "responder certificate has EKU anyExtendedKeyUsage besides id-kp-OCSPSigning (BR 7.1.2.8.5: id-kp-OCSPSigning only)"),
    ({"eku": [OCSP], "nocheck": "absent"}, "responder certificate lacks id-pkix-ocsp-nocheck (BR 7.1.2.8.6)"),
    ({"eku": [OCSP], "nocheck": "critical"},
     "responder certificate marks id-pkix-ocsp-nocheck critical (BR 7.1.2.8.2: non-critical)"),
    ({"eku": [OCSP], "nocheck": "malformed"}, "responder certificate has a malformed extension: "),
    ({"eku": [OCSP], "ku": None}, "responder certificate lacks keyUsage digitalSignature (BR 7.1.2.8.7)"),
    ({"eku": [OCSP], "ku": NO_DS}, "responder certificate lacks keyUsage digitalSignature (BR 7.1.2.8.7)"),
    ({"eku": [OCSP], "ku": DS_KE},
     "responder certificate has keyUsage keyEncipherment besides digitalSignature (BR 7.1.2.8.7: digitalSignature only)"),
    ({"eku": [OCSP], "ku_critical": False}, "responder certificate keyUsage is not critical (BR 7.1.2.8.2)"),
    ({"eku": [OCSP], "extra": (SAN, CRL_DP)},
     "responder certificate has subjectAltName, cRLDistributionPoints (BR 7.1.2.8.2: MUST NOT)"),
    ({"eku": [OCSP], "extra": (POLICIES, NAME_CONSTRAINTS)},  # certificatePolicies: SHOULD NOT, so not named
     "responder certificate has nameConstraints (BR 7.1.2.8.2: MUST NOT)"),
    ({"eku": [OCSP], "ca": True},
     "responder certificate is a CA certificate (basicConstraints cA TRUE; BR 7.1.2.8.4: cA FALSE)"),
    ({"eku": [OCSP], "aki": "absent"}, "responder certificate lacks authorityKeyIdentifier (BR 7.1.2.8.2: MUST)"),
    ({"eku": [OCSP], "aki_critical": True},
     "responder certificate marks authorityKeyIdentifier critical (BR 7.1.2.8.2, RFC 5280 §4.2.1.1: non-critical)"),
    ({"eku": [OCSP], "aki": "issuer-serial"},
     "responder certificate authorityKeyIdentifier lacks keyIdentifier (BR 7.1.2.11.1: MUST be present)"),
    ({"eku": [OCSP], "aki": "keyid+issuer-serial"},
     "responder certificate authorityKeyIdentifier has authorityCertIssuer or authorityCertSerialNumber "
     "(BR 7.1.2.11.1: MUST NOT be present)"),
    ({"eku": [OCSP], "aki": "other-keyid"}, "responder certificate authorityKeyIdentifier keyIdentifier "),
], ids=["no-eku", "serverAuth-only", "issued-by-root", "serverAuth-too", "anyEKU-too", "no-nocheck", "critical-nocheck",
        "malformed-nocheck", "no-keyUsage", "keyUsage-without-digitalSignature", "keyUsage-keyEncipherment-too", "keyUsage-not-critical",
        "san-and-crldp", "policies-and-name-constraints", "cA-true", "no-aki", "critical-aki", "aki-without-keyid",
        "aki-with-issuer-and-serial", "aki-of-another-key"])
def test_unusable_responder_certificate_is_refused_naming_the_file(tmp_path, kw, words):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    configured = load_issuers(load_config(demo.config))["issuing-ca"]
    cert = new_responder(demo, **kw)
    assert_refused(demo, f"{demo.responder_cert}: {words}")
    # the responder accepts a rolled-over responder certificate a response carries by the same rules
    with pytest.raises(IdentityError) as refused:
        signed_by(configured, cert)
    assert words in str(refused.value)


def test_conforming_responder_certificate_is_accepted(tmp_path):
    """The profile new_responder makes by default (BR 7.1.2.8) passes every check."""
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    configured = load_issuers(load_config(demo.config))["issuing-ca"]
    cert = new_responder(demo, eku=[OCSP])
    assert signed_by(configured, cert).signer.cert == cert
    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == len(unexpired(demo)), summary["failures"]
    assert verify_clean(demo) == len(unexpired(demo))


def test_issuing_ca_without_digital_signature_may_not_sign_itself(tmp_path):
    """BR 7.1.2.10.7: keyUsage digitalSignature when the CA key signs OCSP;
    with a delegated responder the CA needs no digitalSignature."""
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0, signer="issuer")
    new_issuing_ca(demo, ku=x509.KeyUsage(False, False, False, False, False, True, True, False, False))
    assert_refused(demo, f"{demo.issuing_ca}: issuer certificate lacks keyUsage digitalSignature, so its key cannot "
                         "sign OCSP responses itself (BR 7.1.2.10.7)")

    delegated = build_demo(tmp_path / "delegated", certs=2, precerts=1, revoke=0)
    new_issuing_ca(delegated, ku=x509.KeyUsage(False, False, False, False, False, True, True, False, False))
    ident = load_issuers(load_config(delegated.config))["issuing-ca"]
    with pytest.raises(IdentityError, match="lacks keyUsage digitalSignature"):
        signed_by(ident, None)  # a response signed by the CA key is not accepted for it either
    code, summary = run_json(delegated)
    assert code == 0 and summary["published"] == len(unexpired(delegated)), summary["failures"]


def test_responder_expiring_before_next_update_cuts_next_update_to_its_not_after(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=1)
    cert = new_responder(demo, eku=[ExtendedKeyUsageOID.OCSP_SIGNING], lifetime=dt.timedelta(days=2))
    code, summary = run_json(demo)
    assert code == 0 and summary["ok"] and summary["published"] == len(unexpired(demo)), summary["failures"]
    for serial in unexpired(demo):
        resp = x509_ocsp.load_der_ocsp_response(response_path(demo, serial).read_bytes())
        assert resp.next_update_utc == cert.not_valid_after_utc  # 2 days, not the configured 7
        assert resp.this_update_utc < resp.next_update_utc and resp.certificates[0] == cert
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified, view.text


def test_verify_accepts_next_update_cut_back_to_the_signer_not_after(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    new_responder(demo, eku=[ExtendedKeyUsageOID.OCSP_SIGNING], lifetime=dt.timedelta(days=2))
    assert run_json(demo)[0] == 0
    assert verify_clean(demo) == 2


def test_response_cut_back_by_the_signer_is_refreshed_8h_before_next_update(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    new_responder(demo, eku=[ExtendedKeyUsageOID.OCSP_SIGNING], lifetime=dt.timedelta(days=2))
    assert run_json(demo)[0] == 0
    # as if signed 2 days ago: the cut-back nextUpdate is 1 h away, thisUpdate + refresh_after is not
    now = int(utc_now().timestamp())
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:
        db.execute("UPDATE published SET this_update = ?, next_update = ?", (now - 2 * 86400, now + 3600))
    code, summary = run_json(demo)
    assert summary["due"] == {"refresh": 2}, summary["due"]


@pytest.mark.parametrize("lifetime", [dt.timedelta(hours=5), dt.timedelta(hours=-2)], ids=["5h-left", "expired"])
def test_responder_with_less_than_8h_left_fails_every_serial_clearly(tmp_path, lifetime):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    cert = new_responder(demo, eku=[ExtendedKeyUsageOID.OCSP_SIGNING], lifetime=lifetime)
    p = ocspmint(demo, "run", "--quiet", "--json")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    summary = json.loads(p.stdout)
    assert summary["published"] == 0 and len(summary["failures"]) == 3
    expected = (f"signer certificate of issuing-ca expires {cert.not_valid_after_utc.isoformat()}: "
                "less than 8 h of validity left (BR 4.9.9)")
    assert all(f["stage"] == "sign" and f["message"] == expected for f in summary["failures"]), summary["failures"][0]
    assert file_objects(demo) == {} and journal_rows(demo) == {}


@pytest.mark.parametrize("signer", ["delegated", "issuer"])
def test_signer_not_valid_yet_fails_every_serial_clearly(tmp_path, signer):
    """A signer certificate whose notBefore is ahead of this host's clock (a
    new certificate from a CA whose clock runs ahead) signs nothing, like an
    expired one: thisUpdate may be neither in the future nor before it."""
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0, signer=signer)
    if signer == "delegated":
        cert, path, what = new_responder(demo, eku=[OCSP], not_before=dt.timedelta(hours=1)), demo.responder_cert, "responder"
    else:
        cert, path, what = new_issuing_ca(demo, not_before=dt.timedelta(hours=1)), demo.issuing_ca, "issuer"
    p = ocspmint(demo, "run", "--quiet", "--json")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    summary = json.loads(p.stdout)
    assert summary["published"] == 0 and len(summary["failures"]) == 3
    expected = (f"{what} certificate {path} is not valid until {cert.not_valid_before_utc.isoformat()}: "
                "nothing is signed with it before then (thisUpdate never in the future, RFC 6960 §4.2.2.1)")
    assert all(f["stage"] == "sign" and f["message"] == expected for f in summary["failures"]), summary["failures"][0]
    assert file_objects(demo) == {} and journal_rows(demo) == {}


def test_batch_times_of_a_signer_valid_from_now_on(tmp_path):
    """The boundary of the case above: a second before notBefore is refused
    by name, at notBefore thisUpdate = producedAt = notBefore."""
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    cert = new_responder(demo, eku=[OCSP], not_before=dt.timedelta(seconds=5))
    config = load_config(demo.config)
    ident = load_issuers(config)["issuing-ca"]
    nb = cert.not_valid_before_utc
    with pytest.raises(ValueError, match=f"^responder certificate {demo.responder_cert} is not valid until "):
        batch_times(config, ident, nb - dt.timedelta(seconds=1))
    times = batch_times(config, ident, nb)
    assert times.produced_at == times.this_update == nb and times.next_update == nb + config.response.validity
    ResponseTemplate(ident, ("sha1",)).time_fields(times)  # encodable
