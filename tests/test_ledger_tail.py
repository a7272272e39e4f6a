"""ledger.tail: incremental reading of real `openssl ca` databases, certificate
folders and SQLite ledgers while a CA keeps issuing and revoking."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ocspmint.config import Config, Source, load_config
from ocspmint.demo import Demo, ISSUER_NAME, build_demo, issue, revoke
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.ledger import openssl_hex, read_source
from ocspmint.ledger.sqlite import ingest, write_entries
from ocspmint.ledger.tail import Change, Tail
from ocspmint.model import UTC, Kind, LedgerEntry, LedgerError, Reason, Status, serial_hex

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """A demo CA every test of this module keeps issuing from and revoking in."""
    return build_demo(tmp_path_factory.mktemp("tail"), certs=3, precerts=2, revoke=1)


@pytest.fixture(scope="module")
def config(ca: Demo) -> Config:
    return load_config(ca.config)


@pytest.fixture(scope="module")
def issuers(config: Config) -> dict[str, IssuerIdentity]:
    return load_issuers(config)


def started(source: Source, issuers: dict[str, IssuerIdentity]) -> Tail:
    """A Tail after start() and the full pass a service does next."""
    tail = Tail(source, issuers)
    tail.start()
    assert not any(isinstance(i, LedgerError) for i in read_source(source, issuers))
    return tail


def by_serial(changes: list[Change]) -> dict[int, LedgerEntry]:
    entries = [c.item for c in changes if isinstance(c.item, LedgerEntry)]
    assert len(entries) == len(changes), [c.item for c in changes if isinstance(c.item, LedgerError)]
    out = {e.serial: e for e in entries}
    assert len(out) == len(entries), "one change per serial"
    return out


def mtime(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.stat().st_mtime_ns // 10**9, UTC)


def not_before(ca: Demo, serial: int) -> dt.datetime:
    return x509.load_pem_x509_certificate(ca.cert_path(serial).read_bytes()).not_valid_before_utc


# ---------------------------------------------------------------- openssl index


def test_index_new_issuance_then_revocation(ca: Demo, config: Config, issuers: dict[str, IssuerIdentity]) -> None:
    tail = started(config.sources[0], issuers)
    assert list(tail.changes()) == []
    lines_before = len(ca.index.read_text().splitlines())
    cert, pre = issue(ca), issue(ca, precert=True)
    changes = list(tail.changes())
    got = by_serial(changes)
    assert set(got) == {cert, pre}
    assert got[cert].kind is Kind.CERTIFICATE and got[pre].kind is Kind.PRECERTIFICATE
    assert got[cert].status is Status.GOOD and got[cert].not_before == not_before(ca, cert)
    assert [e.source for e in got.values()] == [f"{ca.index}:{lines_before + 1}", f"{ca.index}:{lines_before + 2}"]
    assert {c.seen_at for c in changes} == {mtime(ca.index)}
    assert list(tail.changes()) == [], "each change comes once"
    revoke(ca, cert, "keyCompromise")  # openssl ca rewrites the line in place
    (revoked,) = tail.changes()
    assert isinstance(revoked.item, LedgerEntry) and revoked.item.serial == cert
    assert (revoked.item.status, revoked.item.reason) == (Status.REVOKED, Reason.keyCompromise)
    assert revoked.item.source == f"{ca.index}:{lines_before + 1}"


def copied_index(ca: Demo, folder: Path) -> tuple[Path, Source]:
    """A copy of the CA's index.txt (its certificates stay where they are)."""
    index = folder / "index.txt"
    shutil.copy(ca.index, index)
    return index, Source(type="openssl-index", path=str(index), certs_dir=str(ca.certs_dir), issuer=ISSUER_NAME)


def test_index_reads_only_when_the_file_changed(ca: Demo, issuers: dict[str, IssuerIdentity], tmp_path: Path) -> None:
    index, source = copied_index(ca, tmp_path)
    tail = started(source, issuers)
    shutil.copy(index, tmp_path / "new.txt")
    os.replace(tmp_path / "new.txt", index)  # new inode and mtime, same lines
    assert list(tail.changes()) == []
    # same inode, size and mtime: not even read (so this in-place edit goes unseen until the next write)
    st = index.stat()
    text = index.read_text()
    good = next(line for line in text.splitlines() if line.startswith("V\t"))
    index.write_text(text.replace(good, "E" + good[1:]))
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert list(tail.changes()) == []
    os.utime(index)
    (line,) = tail.changes()
    assert isinstance(line.item, LedgerEntry) and openssl_hex(line.item.serial) == good.split("\t")[3]
    with pytest.raises(RuntimeError, match="before Tail.start"):
        Tail(source, issuers).changes()


def test_index_bad_appended_lines_name_their_line(
    ca: Demo, config: Config, issuers: dict[str, IssuerIdentity], tmp_path: Path
) -> None:
    index, source = copied_index(ca, tmp_path)
    tail = started(source, issuers)
    lines = index.read_text().splitlines()
    first = lines[0].split("\t")
    fresh = issue(ca)
    new_line = next(line for line in ca.index.read_text().splitlines() if line.split("\t")[3] == openssl_hex(fresh))
    with index.open("a") as fh:
        fh.write("\t".join(["Q", *first[1:]]) + "\n")  # line n+1
        fh.write(lines[0] + "\n")  # n+2: serial of line 1 again
        fh.write("\n")  # n+3: empty, an error once a row follows
        fh.write(new_line[:20])  # n+4: still being written
    n = len(lines)
    changes = list(tail.changes())
    errors = {c.item.source: str(c.item) for c in changes if isinstance(c.item, LedgerError)}
    assert len(errors) == len(changes) == 2
    assert "unknown status letter 'Q'" in errors[f"{index}:{n + 1}"]
    assert f"duplicate serial {first[3]} (first on line 1)" in errors[f"{index}:{n + 2}"]
    with index.open("a") as fh:
        fh.write(new_line[20:] + "\n")
    changes = list(tail.changes())
    assert [(c.item.source, type(c.item)) for c in changes] == [
        (f"{index}:{n + 3}", LedgerError), (f"{index}:{n + 4}", LedgerEntry)]
    assert "empty line inside the index" in str(changes[0].item) and changes[1].item.serial == fresh
    index.write_text("\n".join([*lines, new_line]) + "\n")  # the operator drops the bad lines
    (moved,) = tail.changes()
    assert moved.item.source == f"{index}:{n + 1}" and moved.item.serial == fresh
    with index.open("a") as fh:
        fh.write(lines[0] + "\n")
    (dup,) = tail.changes()
    assert f"{index}:{n + 2}: duplicate serial {first[3]} (first on line 1)" in str(dup.item)


def test_index_unreadable_raises_and_recovers(ca: Demo, issuers: dict[str, IssuerIdentity], tmp_path: Path) -> None:
    index, source = copied_index(ca, tmp_path)
    tail = started(source, issuers)
    index.rename(tmp_path / "away.txt")
    with pytest.raises(LedgerError, match="cannot read index"):
        list(tail.changes())
    (tmp_path / "away.txt").rename(index)
    assert list(tail.changes()) == []


# ---------------------------------------------------------------- certificate folder


def gencrl(ca: Demo, out: Path) -> None:
    """The CA publishes its CRL the way it would: a new file renamed over the old."""
    tmp = out.with_suffix(".new")
    subprocess.run(["openssl", "ca", "-config", str(ca.openssl_cnf), "-gencrl", "-out", str(tmp)],
                   cwd=ca.openssl_cnf.parent, check=True, capture_output=True)
    os.replace(tmp, out)


def resign(ca: Demo, serial: int, out: Path, days: int = 0) -> None:
    """Another certificate for ``serial``'s TBS without the CT poison, ``days``
    longer, signed by the issuing CA: with days=0 the final certificate of a
    precertificate (RFC 6962 §3.1), else a clash under the same serial."""
    old = x509.load_pem_x509_certificate(ca.cert_path(serial).read_bytes())
    key = serialization.load_pem_private_key(ca.issuing_key.read_bytes(), None)
    b = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer).public_key(old.public_key())
         .serial_number(serial).not_valid_before(old.not_valid_before_utc)
         .not_valid_after(old.not_valid_after_utc + dt.timedelta(days=days)))
    for ext in old.extensions:
        if ext.oid.dotted_string != "1.3.6.1.4.1.11129.2.4.3":
            b = b.add_extension(ext.value, ext.critical)
    out.write_bytes(b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]


def test_certdir_new_files_and_crl_revocations(ca: Demo, issuers: dict[str, IssuerIdentity], tmp_path: Path) -> None:
    folder, crl = tmp_path / "certs", tmp_path / "ca.crl"
    shutil.copytree(ca.certs_dir, folder / "old")
    gencrl(ca, crl)
    tail = started(Source(type="certdir", path=str(folder), crls=[str(crl)]), issuers)
    assert list(tail.changes()) == []
    gencrl(ca, crl)  # a fresh CRL with the same revocations
    assert list(tail.changes()) == []

    pre, cert = issue(ca, precert=True), issue(ca)
    (folder / "new").mkdir()
    shutil.copy(ca.cert_path(pre), folder / "new" / "pre.pem")
    shutil.copy(ca.cert_path(cert), folder / "new" / "cert.pem")
    (folder / "new" / "junk.der").write_bytes(b"\x30\x03\x02\x01\x01")
    written = dt.datetime(2026, 3, 1, 12, 0, 7, tzinfo=UTC)  # when the CA wrote the files
    for f in (folder / "new").iterdir():
        os.utime(f, (written.timestamp(), written.timestamp() + 0.5))
    changes = list(tail.changes())
    errors = [c.item for c in changes if isinstance(c.item, LedgerError)]
    assert [e.source for e in errors] == [str(folder / "new" / "junk.der")]
    got = by_serial([c for c in changes if isinstance(c.item, LedgerEntry)])
    assert set(got) == {pre, cert} and got[pre].kind is Kind.PRECERTIFICATE
    assert got[cert].not_before == not_before(ca, cert)
    assert {c.seen_at for c in changes} == {written}

    resign(ca, pre, folder / "new" / "final.pem")  # the precertificate's final certificate arrives
    (upgraded,) = tail.changes()
    assert isinstance(upgraded.item, LedgerEntry) and upgraded.item.serial == pre
    assert upgraded.item.kind is Kind.CERTIFICATE and upgraded.item.source == str(folder / "new" / "final.pem")
    resign(ca, cert, folder / "new" / "clash.pem", days=1)  # another certificate under a known serial
    (clash,) = tail.changes()
    assert isinstance(clash.item, LedgerError) and "different certificates share serial" in str(clash.item)
    assert "clash.pem" in str(clash.item) and "cert.pem" in str(clash.item)
    (folder / "new" / "clash.pem").unlink()  # the operator removes it: the serial is whole again
    (recovered,) = tail.changes()
    assert isinstance(recovered.item, LedgerEntry) and recovered.item.serial == cert

    revoke(ca, cert, "superseded")
    gencrl(ca, crl)
    (revoked,) = tail.changes()
    assert isinstance(revoked.item, LedgerEntry) and revoked.item.serial == cert
    assert (revoked.item.status, revoked.item.reason) == (Status.REVOKED, Reason.superseded)
    assert revoked.seen_at == mtime(crl)
    assert list(tail.changes()) == []


# ---------------------------------------------------------------- sqlite ledger


def ledger_entries(n: int) -> Iterator[LedgerEntry]:
    end = dt.datetime(2040, 1, 1, tzinfo=UTC)
    for serial in range(1, n + 1):
        yield LedgerEntry(ISSUER_NAME, serial, Kind.CERTIFICATE, end, Status.GOOD, source="synthetic",
                          not_before=dt.datetime(2025, 1, 1, tzinfo=UTC))


def sql(db: Path, statement: str, *args: object) -> None:
    """What a CA's issuance system does: plain SQL in its own transaction."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(statement, args)


def test_sqlite_ingest_and_ca_system_writes(ca: Demo, config: Config, issuers: dict[str, IssuerIdentity],
                                           tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    assert ingest(str(db), config.sources, issuers).ok
    tail = started(Source(type="sqlite", path=str(db)), issuers)
    assert list(tail.changes()) == []
    assert ingest(str(db), config.sources, issuers).ok  # nothing new: nothing logged
    assert list(tail.changes()) == []

    before = dt.datetime.now(UTC).replace(microsecond=0)
    fresh = issue(ca)
    assert ingest(str(db), config.sources, issuers).ok
    (new,) = tail.changes()
    assert isinstance(new.item, LedgerEntry) and new.item.serial == fresh
    assert new.item.not_before == not_before(ca, fresh) and new.item.source == f"{db}:{ISSUER_NAME}/{serial_hex(fresh)}"
    assert before <= new.seen_at <= dt.datetime.now(UTC)

    # the CA system inserts a row and revokes another, twice in one poll
    sql(db, "INSERT INTO entries(issuer, serial, kind, not_before, not_after, status, source)"
            " VALUES (?, ?, 'precertificate', '2026-01-01T00:00:00Z', '2027-01-01T00:00:00Z', 'good', 'ca-system')",
        ISSUER_NAME, serial_hex(0x77))
    for reason in (4, 1):
        sql(db, "UPDATE entries SET status = 'revoked', revoked_at = '2026-02-01T00:00:00Z', reason = ?"
                " WHERE issuer = ? AND serial = ?", reason, ISSUER_NAME, serial_hex(fresh))
    got = by_serial(list(tail.changes()))
    assert list(got) == [0x77, fresh], "once each, in the order of their first change"
    assert got[0x77].kind is Kind.PRECERTIFICATE and got[0x77].not_before == dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert (got[fresh].status, got[fresh].reason) == (Status.REVOKED, Reason.keyCompromise)
    sql(db, "UPDATE entries SET status = status, source = 'moved' WHERE serial = ?", serial_hex(0x77))
    assert list(tail.changes()) == [], "an UPDATE that changes no status field is not a change"

    sql(db, "UPDATE entries SET not_after = '2027-01-01 00:00:00' WHERE serial = ?", serial_hex(0x77))
    (bad,) = tail.changes()
    assert isinstance(bad.item, LedgerError) and bad.item.source == f"{db}:{ISSUER_NAME}/{serial_hex(0x77)}"
    assert "not_after '2027-01-01 00:00:00' is not a UTC time" in str(bad.item)


V1_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries(
    issuer TEXT NOT NULL, serial TEXT NOT NULL, kind TEXT NOT NULL, not_after TEXT NOT NULL,
    status TEXT NOT NULL, revoked_at TEXT, reason INTEGER, source TEXT NOT NULL,
    PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_sqlite_version_1_is_read_then_migrated(ca: Demo, config: Config, issuers: dict[str, IssuerIdentity],
                                                tmp_path: Path) -> None:
    db = tmp_path / "v1.sqlite"
    serial = ca.serials["good"][0]
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(V1_SCHEMA)
        with conn:
            conn.execute("INSERT INTO entries VALUES (?, ?, 'certificate', '2040-01-01T00:00:00Z', 'good', NULL, NULL, 'x')",
                         (ISSUER_NAME, serial_hex(serial)))
    source = Source(type="sqlite", path=str(db))
    (old,) = read_source(source, issuers)
    assert isinstance(old, LedgerEntry) and old.serial == serial and old.not_before is None
    with pytest.raises(LedgerError, match="schema version '1'.*migrate"):
        Tail(source, issuers).start()
    tail = Tail(source, issuers)
    report = ingest(str(db), config.sources, issuers, "quarantine")  # opening for writing migrates
    assert len(report.errors) == 1 and "changes notAfter" in str(report.errors[0])  # our made-up row
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    entries = {e.serial: e for e in read_source(source, issuers) if isinstance(e, LedgerEntry)}
    assert entries[serial].not_before is None and entries[serial].source == f"{db}:{ISSUER_NAME}/{serial_hex(serial)}"
    assert all(e.not_before is not None for s, e in entries.items() if s != serial)
    tail.start()
    revoke(ca, ca.serials["good"][-1], None)
    assert ingest(str(db), config.sources, issuers, "quarantine").written == 1
    (revoked,) = tail.changes()
    assert isinstance(revoked.item, LedgerEntry) and revoked.item.status is Status.REVOKED


def vm_steps(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts SQLite virtual-machine steps of every connection opened from
    now on: a measure of rows examined that no timing noise affects."""
    steps = [0]
    real = sqlite3.connect

    def tick() -> int:
        steps[0] += 1
        return 0

    def counting(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real(*args, **kwargs)  # type: ignore[arg-type]
        conn.set_progress_handler(tick, 1)
        return conn

    monkeypatch.setattr(sqlite3, "connect", counting)

    def take() -> int:
        n, steps[0] = steps[0], 0
        return n

    return take


def test_sqlite_one_change_costs_the_same_whatever_the_ledger_size(
    issuers: dict[str, IssuerIdentity], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = vm_steps(monkeypatch)

    def one_change(size: int) -> tuple[int, int]:
        """(VM steps of changes() after one UPDATE, VM steps of a full read)."""
        db = tmp_path / f"ledger-{size}.sqlite"
        write_entries(str(db), ledger_entries(size))
        source = Source(type="sqlite", path=str(db))
        tail = Tail(source, issuers)
        tail.start()
        sql(db, "UPDATE entries SET status = 'revoked', revoked_at = '2026-01-01T00:00:00Z' WHERE serial = ?",
            serial_hex(size // 2))
        steps()
        changes = list(tail.changes())
        tail_steps = steps()
        assert [c.item.serial for c in changes if isinstance(c.item, LedgerEntry)] == [size // 2]
        assert len(list(read_source(source, issuers))) == size
        return tail_steps, steps()

    (small_tail, small_full), (big_tail, big_full) = one_change(10), one_change(10_000)
    assert big_full > 100 * small_full, "a full read examines every row"
    assert big_tail == small_tail, "changes() examines the change, not the ledger"
