"""Ledger readers against real `openssl ca` databases built in a temp folder."""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import subprocess
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ocspmint.config import Issuer, Signer, Source
from ocspmint.issuer import IssuerIdentity, issuer_identity
from ocspmint.ledger import openssl_hex, read_source
from ocspmint.ledger.sqlite import ingest
from ocspmint.model import UTC, Kind, LedgerEntry, LedgerError, Reason, Status, serial_hex

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

CA_SUBJECT = "/CN=Ledger Test CA"
TWENTY = "7F0102030405060708090A0B0C0D0E0F10111213"  # 20 octets, high bit clear
SERIALS = {  # name → serial file content (what the operator writes)
    "one": "01",
    "lead0": "0A1B",  # leading zero nibble
    "zerobyte": "00AB12",  # openssl drops the leading zero octet: AB12
    "high": "80FF",  # high bit set: DER needs a 00 octet
    "twenty": TWENTY,
    "pre": "1234",
    "expired": "2000",
    "far": "3000",
    "good": "4000",
}
CNF = """
[ca]
default_ca = CA_default
[CA_default]
database = {db}/index.txt
new_certs_dir = {db}/newcerts
serial = {db}/serial
certificate = {ca}/ca.pem
private_key = {ca}/ca.key
default_md = sha256
default_days = 90
default_crl_days = 7
policy = pol
unique_subject = no
[pol]
commonName = supplied
[leaf]
basicConstraints = critical,CA:FALSE
authorityKeyIdentifier = keyid
[precert]
basicConstraints = critical,CA:FALSE
authorityKeyIdentifier = keyid
1.3.6.1.4.1.11129.2.4.3 = critical,DER:0500
"""


def run(*args: str | Path, cwd: Path) -> None:
    subprocess.run([str(a) for a in args], cwd=cwd, check=True, capture_output=True)


@dataclass
class CA:
    dir: Path  # holds ca.key, ca.pem, leaf.key, leaf.csr
    name: str

    def db(self, sub: str) -> Path:
        """A fresh `openssl ca` database folder using this CA's key."""
        d = self.dir / sub
        (d / "newcerts").mkdir(parents=True)
        (d / "index.txt").write_text("")
        (d / "ca.cnf").write_text(CNF.format(db=d, ca=self.dir))
        return d

    def issue(self, db: Path, serial: str, cn: str, *extra: str, ext: str = "leaf") -> None:
        (db / "serial").write_text(serial + "\n")
        run("openssl", "ca", "-config", db / "ca.cnf", "-batch", "-in", self.dir / "leaf.csr",
            "-subj", f"/CN={cn}", "-extensions", ext, *extra, "-out", db / f"{cn}.pem", cwd=db)

    def ca(self, db: Path, *args: str | Path) -> None:
        run("openssl", "ca", "-config", db / "ca.cnf", *args, cwd=db)

    def identity(self) -> IssuerIdentity:
        return issuer_identity(Issuer(name=self.name, cert=str(self.dir / "ca.pem"), signer=Signer(uri="pkcs11:object=x")))


def make_ca(root: Path, name: str) -> CA:
    d = root / name
    d.mkdir()
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    run("openssl", "req", "-new", "-x509", "-key", "ca.key", "-subj", CA_SUBJECT, "-days", "3650", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        # digitalSignature: issuer_identity refuses a CA that signs OCSP itself without it (BR 7.1.2.10.7)
        "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign", cwd=d)
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "leaf.key", cwd=d)
    run("openssl", "req", "-new", "-key", "leaf.key", "-subj", "/CN=leaf", "-out", "leaf.csr", cwd=d)
    return CA(d, name)


@dataclass
class World:
    ca: CA
    twin: CA  # same subject name, different key
    db: Path  # the main index database
    final_db: Path  # second database of `ca`: final cert for the precert, a clashing serial
    twin_db: Path
    enddate: dt.datetime
    issuers: dict[str, IssuerIdentity]

    def index_source(self, path: Path | None = None, issuer: str = "ca") -> Source:
        return Source(type="openssl-index", path=str(path or self.db / "index.txt"),
                      certs_dir=str(self.db / "newcerts"), issuer=issuer)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("ledger")
    ca, twin = make_ca(root, "ca"), make_ca(root, "twin")
    start = dt.datetime.now(UTC).replace(microsecond=0)
    end = start + dt.timedelta(days=90)
    # one explicit validity for all: a precertificate and its final certificate share it (RFC 6962 §3.1),
    # so they must not straddle a second boundary between two `openssl ca` calls
    validity = ["-startdate", start.strftime("%Y%m%d%H%M%SZ"), "-enddate", end.strftime("%Y%m%d%H%M%SZ")]
    db = ca.db("db")
    for cn, serial in SERIALS.items():
        if cn == "pre":
            ca.issue(db, serial, cn, *validity, ext="precert")
        elif cn == "expired":
            ca.issue(db, serial, cn, "-startdate", "20200101000000Z", "-enddate", "20210101000000Z")
        elif cn == "far":
            ca.issue(db, serial, cn, "-enddate", "20600101000000Z")
        else:
            ca.issue(db, serial, cn, *validity)
    ca.ca(db, "-updatedb")
    ca.ca(db, "-revoke", db / "one.pem", "-crl_reason", "keyCompromise")
    ca.ca(db, "-revoke", db / "lead0.pem")
    ca.ca(db, "-revoke", db / "high.pem", "-crl_reason", "unspecified")
    ca.ca(db, "-revoke", db / "twenty.pem", "-crl_compromise", "20240101000000Z")
    ca.ca(db, "-revoke", db / "pre.pem", "-crl_reason", "superseded")
    ca.ca(db, "-gencrl", "-out", db / "crl.pem")
    final_db = ca.db("final")
    ca.issue(final_db, "1234", "final", *validity)  # the final certificate of the precertificate
    ca.issue(final_db, "0A1B", "clash", *validity)  # a different certificate reusing serial 0A1B
    twin_db = twin.db("db")
    twin.issue(twin_db, "01", "twin-one", *validity)
    twin.ca(twin_db, "-gencrl", "-out", twin_db / "crl.pem")
    issuers = {"ca": ca.identity(), "twin": twin.identity()}
    return World(ca, twin, db, final_db, twin_db, end, issuers)


def split(items: list[LedgerEntry | LedgerError]) -> tuple[dict[int, LedgerEntry], list[LedgerError]]:
    entries = [i for i in items if isinstance(i, LedgerEntry)]
    by_serial = {e.serial: e for e in entries}
    assert len(by_serial) == len(entries), "one entry per serial"
    return by_serial, [i for i in items if isinstance(i, LedgerError)]


def index_lines(world: World) -> list[str]:
    return (world.db / "index.txt").read_text().splitlines()


# ---------------------------------------------------------------- openssl index


def test_index_every_serial_round_trips_as_int(world: World) -> None:
    entries, errors = split(list(read_source(world.index_source(), world.issuers)))
    assert errors == []
    expected = {int(s, 16) for s in SERIALS.values()}
    assert set(entries) == expected
    assert 0xAB12 in entries and 0x0A1B in entries and int(TWENTY, 16) in entries
    for serial, e in entries.items():
        cert = x509.load_pem_x509_certificate((world.db / "newcerts" / f"{openssl_hex(serial)}.pem").read_bytes())
        assert cert.serial_number == serial and e.issuer == "ca"
        assert e.not_after == cert.not_valid_after_utc and e.not_after.tzinfo is UTC
        assert e.source.startswith(str(world.db / "index.txt") + ":")


def test_index_precertificate_detected(world: World) -> None:
    entries, _ = split(list(read_source(world.index_source(), world.issuers)))
    assert entries[0x1234].kind is Kind.PRECERTIFICATE
    assert {s for s, e in entries.items() if e.kind is Kind.PRECERTIFICATE} == {0x1234}


def test_index_revocations(world: World) -> None:
    entries, _ = split(list(read_source(world.index_source(), world.issuers)))
    rows = {line.split("\t")[3]: line.split("\t") for line in index_lines(world)}
    expect = {"01": Reason.keyCompromise, "0A1B": None, "80FF": None, TWENTY: Reason.keyCompromise,
              "1234": Reason.superseded}
    assert rows[TWENTY][2].endswith(",keyTime,20240101000000Z")  # -crl_compromise form
    assert rows["80FF"][2].endswith(",unspecified")
    assert "," not in rows["0A1B"][2]
    for text, reason in expect.items():
        e = entries[int(text, 16)]
        assert e.status is Status.REVOKED and e.reason is reason
        t = rows[text][2].split(",")[0]
        assert e.revoked_at == dt.datetime.strptime(t, "%y%m%d%H%M%SZ").replace(tzinfo=UTC)
        assert e.revoked_at.microsecond == 0
    for text in ("AB12", "2000", "3000", "4000"):
        e = entries[int(text, 16)]
        assert e.status is Status.GOOD and e.revoked_at is None and e.reason is None


def test_index_expired_and_generalized_time(world: World) -> None:
    rows = {line.split("\t")[3]: line.split("\t") for line in index_lines(world)}
    assert rows["2000"][0] == "E" and rows["3000"][1] == "20600101000000Z"
    entries, _ = split(list(read_source(world.index_source(), world.issuers)))
    assert entries[0x2000].status is Status.GOOD
    assert entries[0x2000].not_after == dt.datetime(2021, 1, 1, tzinfo=UTC) < dt.datetime.now(UTC)
    assert entries[0x3000].not_after == dt.datetime(2060, 1, 1, tzinfo=UTC)


def test_index_malformed_rows(world: World, tmp_path: Path) -> None:
    lines = index_lines(world)
    good = next(line for line in lines if line.split("\t")[3] == "4000")
    f = good.split("\t")
    f[3] = "4001"  # a serial no good row has: a bad row naming 4000 would withhold it (next test)
    bad = [
        ("bad expiry date '2X0101000000Z'", "\t".join([f[0], "2X0101000000Z", *f[2:]])),
        ("serial 'zz' is not hexadecimal", "\t".join([*f[:3], "zz", *f[4:]])),
        ("unknown status letter 'Q'", "\t".join(["Q", *f[1:]])),
        ("certificate file " + str(world.db / "newcerts" / "DEAD.pem") + " is missing", "\t".join([*f[:3], "DEAD", *f[4:]])),
        ("expected 6 tab-separated fields, found 5", "\t".join(f[:5])),
        ("certificateHold is forbidden (BR 4.9.13)", "\t".join(["R", f[1], "250101000000Z,certificateHold", "BEEF", *f[4:]])),
        ("unknown revocation reason 'privilegeGone'", "\t".join(["R", f[1], "250101000000Z,privilegeGone", "BEEF", *f[4:]])),
        ("status R without a revocation date", "\t".join(["R", *f[1:]])),
        ("status V with a revocation field '250101000000Z'", "\t".join([f[0], f[1], "250101000000Z", *f[3:]])),
        ("bad revocation date '25010100000Z'", "\t".join(["R", f[1], "25010100000Z", *f[3:]])),
        ("serial 0x0 is not a positive integer", "\t".join([*f[:3], "00", *f[4:]])),
        ("duplicate serial 4000 (first on line", good),  # after the original 4000 row
    ]
    mixed: list[str] = []
    expect: dict[int, str] = {}
    for i in range(max(len(lines), len(bad))):
        if i < len(lines):
            mixed.append(lines[i])
        if i < len(bad):
            mixed.append(bad[i][1])
            expect[len(mixed)] = bad[i][0]
    path = tmp_path / "index.txt"
    path.write_text("\n".join(mixed) + "\n\n")  # empty trailing lines are fine
    entries, errors = split(list(read_source(world.index_source(path), world.issuers)))
    assert set(entries) == {int(s, 16) for s in SERIALS.values()}, "good rows around bad ones come through"
    assert len(errors) == len(expect)
    got = {e.source: str(e) for e in errors}
    for lineno, msg in expect.items():
        text = got[f"{path}:{lineno}"]
        assert f"index.txt:{lineno}: " in text and msg in text, text


def test_index_certificate_file_disagrees(world: World, tmp_path: Path) -> None:
    f = index_lines(world)[-1].split("\t")  # serial 4000
    shutil.copy(world.db / "newcerts" / "01.pem", tmp_path / "0A1B.pem")  # another serial
    shutil.copy(world.db / "newcerts" / "4000.pem", tmp_path / "4000.pem")
    (tmp_path / "5000.pem").write_text("not a certificate")
    path = tmp_path / "index.txt"
    path.write_text("\n".join([
        "\t".join(["V", f[1], "", "0A1B", "unknown", "/CN=x"]),
        "\t".join(["V", "300101000000Z", "", "4000", "unknown", "/CN=x"]),
        "\t".join(["V", f[1], "", "5000", "unknown", "/CN=x"]),
    ]) + "\n")
    src = Source(type="openssl-index", path=str(path), certs_dir=str(tmp_path), issuer="ca")
    e1, e2, e3 = list(read_source(src, world.issuers))
    assert "index.txt:1: certificate file" in str(e1) and "has serial 01, the row says 0A1B" in str(e1)
    assert "index.txt:2: expiry 2030-01-01T00:00:00Z disagrees with notAfter" in str(e2)
    assert "index.txt:3: certificate file" in str(e3) and "5000.pem not a DER certificate" in str(e3)


def test_index_real_hold_and_bad_lines(world: World, tmp_path: Path) -> None:
    db = tmp_path / "db"
    shutil.copytree(world.db, db)
    (db / "ca.cnf").write_text(CNF.format(db=db, ca=world.ca.dir))
    world.ca.ca(db, "-revoke", db / "good.pem", "-crl_hold", "1.2.840.10040.2.2")
    src = Source(type="openssl-index", path=str(db / "index.txt"), certs_dir=str(db / "newcerts"), issuer="ca")
    entries, errors = split(list(read_source(src, world.issuers)))
    (err,) = errors
    assert "holdInstruction" in str(err) and "BR 4.9.13" in str(err) and "index.txt:" in err.source
    assert 0x4000 not in entries and len(entries) == len(SERIALS) - 1


def test_index_refused_line_names_its_serial_and_a_later_good_line_does_not_win(world: World, tmp_path: Path) -> None:
    """Serial 4000 revoked on a line the reader refuses (text after the
    reason), then stated good on a later line: both lines are errors naming
    ("ca", 0x4000), so the serial is published from neither (before: the
    refused line was skipped and the good line served `good`). Ingest
    (quarantine) takes it from no line either."""
    lines = index_lines(world)
    i = next(n for n, line in enumerate(lines) if line.split("\t")[3] == "4000")
    f = lines[i].split("\t")
    refused = "\t".join(["R", f[1], "261120000000Z,keyCompromise,20261120000000Z", *f[3:]])
    path = tmp_path / "index.txt"
    path.write_text("\n".join([*lines[:i], refused, *lines[i + 1:], lines[i]]) + "\n")
    entries, errors = split(list(read_source(world.index_source(path), world.issuers)))
    assert 0x4000 not in entries and len(entries) == len(SERIALS) - 1
    assert [(e.source, e.key) for e in errors] == [(f"{path}:{i + 1}", ("ca", 0x4000)),
                                                   (f"{path}:{len(lines) + 1}", ("ca", 0x4000))]
    assert "unexpected text '20261120000000Z'" in str(errors[0]) and f"(first on line {i + 1})" in str(errors[1])
    db = str(tmp_path / "ledger.db")
    report = ingest(db, [world.index_source(path)], world.issuers, "quarantine")
    assert report.sources[0].written == len(SERIALS) - 1 and len(report.errors) == 2
    stored, _ = split(list(read_source(Source(type="sqlite", path=db), world.issuers)))
    assert 0x4000 not in stored


def test_ingest_takes_no_line_of_a_serial_stated_twice_differently(world: World, tmp_path: Path) -> None:
    """index.txt says 4000 good on one line and revoked on a later one: a
    run publishes neither (LedgerError.key), and ingest (quarantine) must
    not commit the first line's `good` either (it did)."""
    lines = index_lines(world)
    f = next(line for line in lines if line.split("\t")[3] == "4000").split("\t")
    path = tmp_path / "index.txt"
    path.write_text("\n".join([*lines, "\t".join(["R", f[1], "261120000000Z,keyCompromise", *f[3:]])]) + "\n")
    db = str(tmp_path / "ledger.db")
    report = ingest(db, [world.index_source(path)], world.issuers, "quarantine")
    assert [str(e) for e in report.errors] == [f"{path}:{len(lines) + 1}: duplicate serial 4000 (first on line "
                                               f"{[line.split(chr(9))[3] for line in lines].index('4000') + 1})"]
    stored, _ = split(list(read_source(Source(type="sqlite", path=db), world.issuers)))
    assert 0x4000 not in stored and len(stored) == len(SERIALS) - 1


def test_index_revocation_in_the_future_is_refused(world: World, tmp_path: Path) -> None:
    """A revocation dated 2049 (a local time written as Z, a typo) is an
    error row naming the serial, never a response that says so."""
    lines = index_lines(world)
    f = lines[0].split("\t")  # serial 01, revoked
    path = tmp_path / "index.txt"
    path.write_text("\n".join(["\t".join([f[0], f[1], "491231000000Z,keyCompromise", *f[3:]]), *lines[1:]]) + "\n")
    entries, errors = split(list(read_source(world.index_source(path), world.issuers)))
    (err,) = errors
    assert err.key == ("ca", 1) and 1 not in entries
    assert "revocation date 2049-12-31T00:00:00Z is in the future" in str(err) and "index.txt:1:" in str(err)


def test_index_expired_row_needs_no_certificate_file(world: World, tmp_path: Path) -> None:
    """CAs prune the files of expired certificates: the expired row (2000)
    is still an entry (nothing is signed for it), while an unexpired row
    whose file is gone stays an error. Before, the pruned file stopped
    the whole run under on_error = "stop"."""
    certs = tmp_path / "newcerts"
    shutil.copytree(world.db / "newcerts", certs)
    (certs / "2000.pem").unlink()
    (certs / "4000.pem").unlink()
    src = Source(type="openssl-index", path=str(world.db / "index.txt"), certs_dir=str(certs), issuer="ca")
    entries, errors = split(list(read_source(src, world.issuers)))
    expired = entries[0x2000]
    assert expired.not_after < dt.datetime.now(UTC) and expired.kind is Kind.CERTIFICATE and expired.not_before is None
    (err,) = errors
    assert err.key == ("ca", 0x4000) and "4000.pem is missing" in str(err)


def test_index_blank_line_inside_and_wrong_issuer(world: World, tmp_path: Path) -> None:
    lines = index_lines(world)
    path = tmp_path / "index.txt"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    entries, errors = split(list(read_source(world.index_source(path), world.issuers)))
    assert len(entries) == len(SERIALS) and [e.source for e in errors] == [f"{path}:2"]
    # the twin CA has the same subject name: AKI must tell them apart
    entries, errors = split(list(read_source(world.index_source(issuer="twin"), world.issuers)))
    assert not entries and len(errors) == len(SERIALS)
    assert all("authorityKeyIdentifier" in str(e) for e in errors)


def test_index_unusable_source_raises(world: World, tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="cannot read index"):
        next(iter(read_source(world.index_source(tmp_path / "nope.txt"), world.issuers)))
    with pytest.raises(LedgerError, match="not configured"):
        next(iter(read_source(world.index_source(issuer="nobody"), world.issuers)))


# ---------------------------------------------------------------- certificate folder


def self_signed(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.DER))


def pem_to_der(src: Path, dst: Path) -> None:
    dst.write_bytes(x509.load_pem_x509_certificate(src.read_bytes()).public_bytes(serialization.Encoding.DER))


def certdir_source(d: Path, *crls: Path) -> Source:
    return Source(type="certdir", path=str(d), crls=[str(c) for c in crls])


def test_certdir_dedups_precert_and_applies_crl(world: World, tmp_path: Path) -> None:
    d = tmp_path / "certs"
    shutil.copytree(world.db / "newcerts", d / "sub")
    pem_to_der(world.final_db / "final.pem", d / "final-1234.der")
    shutil.copy(world.ca.dir / "ca.pem", d / "ca.pem")  # the issuer itself: skipped
    bundle = (world.twin_db / "twin-one.pem").read_bytes()
    (d / "bundle.pem").write_bytes(b"some text\n" + bundle + bundle)  # the same cert twice
    items = list(read_source(certdir_source(d, world.db / "crl.pem", world.twin_db / "crl.pem"), world.issuers))
    assert items == list(read_source(certdir_source(d, world.db / "crl.pem", world.twin_db / "crl.pem"), world.issuers))
    entries = [i for i in items if isinstance(i, LedgerEntry)]
    errors = [i for i in items if isinstance(i, LedgerError)]
    assert errors == []
    by_key = {(e.issuer, e.serial): e for e in entries}
    assert len(by_key) == len(entries) == len(SERIALS) + 1
    final = by_key[("ca", 0x1234)]
    assert final.kind is Kind.CERTIFICATE and final.source == str(d / "final-1234.der")
    assert final.status is Status.REVOKED and final.reason is Reason.superseded
    assert by_key[("twin", 1)].status is Status.GOOD and by_key[("twin", 1)].kind is Kind.CERTIFICATE
    index, _ = split(list(read_source(world.index_source(), world.issuers)))
    for serial, e in index.items():  # CRL revocations agree with the index
        c = by_key[("ca", serial)]
        assert (c.status, c.revoked_at, c.reason, c.not_after) == (e.status, e.revoked_at, e.reason, e.not_after)


def test_certdir_precert_alone_and_bad_files(world: World, tmp_path: Path) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    shutil.copy(world.db / "newcerts" / "1234.pem", d / "a.pem")
    shutil.copy(world.final_db / "newcerts" / "0A1B.pem", d / "b-clash.pem")
    shutil.copy(world.db / "newcerts" / "0A1B.pem", d / "c-orig.crt")
    (d / "garbage.der").write_bytes(b"\x30\x03\x02\x01\x01")
    (d / "key.pem").write_bytes((world.ca.dir / "leaf.key").read_bytes())
    (d / "notes.txt").write_text("ignored")
    self_signed(d / "stranger.cer")
    entries, errors = split(list(read_source(certdir_source(d), world.issuers)))
    assert list(entries) == [0x1234] and entries[0x1234].kind is Kind.PRECERTIFICATE
    msgs = {e.source: str(e) for e in errors}
    assert set(msgs) == {str(d / n) for n in ("b-clash.pem", "garbage.der", "key.pem", "stranger.cer")}
    assert "different certificates share serial 0A1B" in msgs[str(d / "b-clash.pem")]
    assert "c-orig.crt" in msgs[str(d / "b-clash.pem")]
    assert "not a DER certificate" in msgs[str(d / "garbage.der")]
    assert "'CN=stranger' is not a configured issuer" in msgs[str(d / "stranger.cer")]


def test_certdir_crl_problems(world: World, tmp_path: Path) -> None:
    d = tmp_path / "certs"
    d.mkdir()
    shutil.copy(world.db / "newcerts" / "4000.pem", d / "good.pem")
    # the CRL revokes serials whose certificates are not in the folder
    entries, errors = split(list(read_source(certdir_source(d, world.db / "crl.pem"), world.issuers)))
    assert entries[0x4000].status is Status.GOOD
    assert len(errors) == 5 and all(e.source == str(world.db / "crl.pem") for e in errors)
    assert any("revokes serial 1234 of issuer 'ca' but no certificate" in str(e) for e in errors)
    # a CRL signed by no configured issuer makes the source unusable
    only_twin = {"twin": world.issuers["twin"]}
    with pytest.raises(LedgerError, match="not signed by any configured issuer"):
        list(read_source(certdir_source(d, world.db / "crl.pem"), only_twin))
    with pytest.raises(LedgerError, match="cannot read CRL"):
        list(read_source(certdir_source(d, tmp_path / "missing.crl"), world.issuers))


# ---------------------------------------------------------------- sqlite ledger


def entries_only(items: Iterable[LedgerEntry | LedgerError]) -> list[LedgerEntry]:
    """All items, asserting none is a LedgerError."""
    seen = list(items)
    out = [i for i in seen if isinstance(i, LedgerEntry)]
    assert len(out) == len(seen), [i for i in seen if isinstance(i, LedgerError)]
    return out


def without_source(e: LedgerEntry) -> LedgerEntry:
    return msgspec.structs.replace(e, source="")


def test_sqlite_ingest_round_trip_and_idempotent(world: World, tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    src = world.index_source()
    report = ingest(db, [src], world.issuers, "stop")
    assert report.ok and report.sources[0].read == report.sources[0].written == len(SERIALS)
    read = entries_only(read_source(src, world.issuers))
    stored = entries_only(read_source(Source(type="sqlite", path=db), world.issuers))
    assert [without_source(e) for e in stored] == sorted(map(without_source, read), key=lambda e: (e.issuer, e.serial))
    assert stored[0].source == f"{db}:ca/{serial_hex(stored[0].serial)}"
    again = ingest(db, [src], world.issuers, "stop")
    assert again.ok and again.written == 0 and again.sources[0].unchanged == len(SERIALS)
    # the certdir upgrades the precertificate to certificate and adds the twin's serial
    d = tmp_path / "certs"
    shutil.copytree(world.db / "newcerts", d)
    pem_to_der(world.final_db / "final.pem", d / "final.der")
    shutil.copy(world.twin_db / "twin-one.pem", d / "twin.pem")
    third = ingest(db, [certdir_source(d, world.db / "crl.pem")], world.issuers, "quarantine")
    assert third.ok, third.errors
    stored2 = {(e.issuer, e.serial): e for e in entries_only(read_source(Source(type="sqlite", path=db), world.issuers))}
    assert stored2[("ca", 0x1234)].kind is Kind.CERTIFICATE and ("twin", 1) in stored2


def test_sqlite_stop_commits_nothing_quarantine_keeps_good(world: World, tmp_path: Path) -> None:
    lines = index_lines(world)
    f = lines[0].split("\t")
    path = tmp_path / "index.txt"
    path.write_text("\n".join([*lines, "\t".join(["Q", *f[1:]]), lines[-1]]) + "\n")
    db = str(tmp_path / "ledger.db")
    sources = [world.index_source(path), world.index_source()]
    stop = ingest(db, sources, world.issuers, "stop")
    assert stop.stopped and len(stop.sources) == 1 and not stop.sources[0].committed
    assert "unknown status letter 'Q'" in str(stop.errors[0])
    assert "NOT committed" in stop.text() and "stopped at the first error" in stop.text()
    assert list(read_source(Source(type="sqlite", path=db), world.issuers)) == []
    q = ingest(db, sources, world.issuers, "quarantine")
    assert not q.stopped and len(q.errors) == 2  # bad letter + duplicate serial
    # the serials those two lines name (01, 4000) are taken from no line of that file, then from the clean one
    assert q.sources[0].written == len(SERIALS) - 2 and q.sources[1].committed and q.sources[1].written == len(SERIALS)
    # same data from another file: only the provenance (source column) is rewritten
    stored = list(read_source(Source(type="sqlite", path=db), world.issuers))
    with closing(sqlite3.connect(db)) as conn, conn:
        assert {r[0] for r in conn.execute("SELECT source FROM entries")} == {
            f"{world.db / 'index.txt'}:{n}" for n in range(1, len(SERIALS) + 1)}
    assert len(stored) == len(SERIALS)
    # un-revoking an existing row is refused
    unrevoked = [("\t".join(["V", p[1], "", *p[3:]]) if p[3] == "01" else line)
                 for line in lines for p in [line.split("\t")]]
    path.write_text("\n".join(unrevoked) + "\n")
    r = ingest(db, [world.index_source(path)], world.issuers, "stop")
    assert r.stopped and "would un-revoke" in str(r.errors[0]) and f"{db}:ca/{serial_hex(1)}" in str(r.errors[0])
    after, _ = split(list(read_source(Source(type="sqlite", path=db), world.issuers)))
    assert after[1].status is Status.REVOKED
    # another certificate under an existing serial (different notAfter) is refused too
    other = tmp_path / "other"
    (other / "newcerts").mkdir(parents=True)
    (other / "index.txt").write_text("")
    (other / "ca.cnf").write_text(CNF.format(db=other, ca=world.ca.dir))
    world.ca.issue(other, "4000", "again", "-enddate", "20400101000000Z")
    src = Source(type="openssl-index", path=str(other / "index.txt"), certs_dir=str(other / "newcerts"), issuer="ca")
    r = ingest(db, [src], world.issuers, "quarantine")
    assert not r.stopped and r.sources[0].written == 0 and len(r.errors) == 1
    assert "changes notAfter" in str(r.errors[0]) and "2040-01-01T00:00:00Z" in str(r.errors[0])
    assert "un-revoke" not in str(r.errors[0])


def test_sqlite_reader_flags_bad_rows(world: World, tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    ingest(db, [world.index_source()], world.issuers, "stop")
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE entries SET not_after = '2027-01-01T00:00:00+01:00' WHERE serial = ?", (serial_hex(0x4000),))
        conn.execute("UPDATE entries SET revoked_at = '2025-01-01 00:00:00' WHERE serial = ?", (serial_hex(1),))
        conn.execute("UPDATE entries SET reason = 6 WHERE serial = ?", (serial_hex(0x1234),))
        conn.execute("UPDATE entries SET serial = 'ab12' WHERE serial = ?", (serial_hex(0xAB12),))
        conn.execute("UPDATE entries SET revoked_at = '2049-12-31T00:00:00Z' WHERE serial = ?", (serial_hex(0x80FF),))
    items = list(read_source(Source(type="sqlite", path=db), world.issuers))
    entries, errors = split(items)
    assert len(entries) == len(SERIALS) - 5
    msgs = {e.source: str(e) for e in errors}
    assert "revoked_at 2049-12-31T00:00:00Z is in the future" in msgs[f"{db}:ca/{serial_hex(0x80FF)}"]
    # a row whose serial reads names it (published from no row), the unreadable serial cannot
    assert {e.key for e in errors} == {("ca", s) for s in (0x4000, 1, 0x1234, 0x80FF)} | {None}
    assert "not_after '2027-01-01T00:00:00+01:00' is not a UTC time" in msgs[f"{db}:ca/{serial_hex(0x4000)}"]
    assert "revoked_at '2025-01-01 00:00:00' is not a UTC time" in msgs[f"{db}:ca/{serial_hex(1)}"]
    assert "certificateHold" in msgs[f"{db}:ca/{serial_hex(0x1234)}"]
    assert "not 40 lowercase hex digits" in msgs[f"{db}:ca/ab12"]
    keys = [(i.source.rsplit(":", 1)[1]) for i in items]
    assert keys == sorted(keys), "ordered by (issuer, serial)"
    with pytest.raises(LedgerError, match="does not exist"):
        next(iter(read_source(Source(type="sqlite", path=str(tmp_path / "none.db")), world.issuers)))


def test_sqlite_unusable_sources(world: World, tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="junk.db"):
        list(read_source(Source(type="sqlite", path=str(junk)), world.issuers))
    with pytest.raises(LedgerError, match="cannot open ledger database"):
        ingest(str(junk), [world.index_source()], world.issuers, "stop")
    db = str(tmp_path / "ledger.db")
    missing = world.index_source(tmp_path / "missing.txt")
    q = ingest(db, [missing, world.index_source()], world.issuers, "quarantine")
    assert [s.committed for s in q.sources] == [False, True] and "cannot read index" in str(q.errors[0])
    s = ingest(db, [missing, world.index_source()], world.issuers, "stop")
    assert s.stopped and len(s.sources) == 1
