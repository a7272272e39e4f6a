"""The embedded ledger: one SQLite file holding every assigned serial.

Schema (version 2, ``meta.schema_version``; docs/ledger.md)::

    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE entries(
        issuer     TEXT NOT NULL,  -- config issuer name
        serial     TEXT NOT NULL,  -- 40 lowercase hex digits (model.serial_hex): sorts like the int
        kind       TEXT NOT NULL,  -- 'certificate' | 'precertificate' (model.Kind)
        not_after  TEXT NOT NULL,  -- 'YYYY-MM-DDTHH:MM:SSZ', UTC, whole seconds
        status     TEXT NOT NULL,  -- 'good' | 'revoked' (model.Status)
        revoked_at TEXT NULL,      -- like not_after; set iff status = 'revoked'
        reason     INTEGER NULL,   -- CRLReason (RFC 5280 §5.3.1); NULL = unspecified/absent (BR 7.3.2)
        source     TEXT NOT NULL,  -- where the row was read from ('path:line')
        not_before TEXT NULL,      -- like not_after; NULL = not known (rows from version 1)
        PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
    CREATE TABLE changes(          -- the change log, filled by triggers only
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        issuer TEXT NOT NULL, serial TEXT NOT NULL,  -- the entries row that changed
        at     INTEGER NOT NULL);  -- unix seconds of the change

Triggers add a ``changes`` row for every INSERT into ``entries``, every
UPDATE that alters issuer, serial, kind, not_after, status, revoked_at or
reason (not source or not_before alone), and every DELETE (and the old key
of an UPDATE that moves a row: ``SqliteTail`` reads a key without a row as
``_deleted``), whoever writes: ``ingest``,
``write_entries`` or a CA's issuance system writing SQL directly. ``SqliteTail``
(``ledger.tail``) reads the log from the last id it saw. Nothing here prunes
it (one row of ~70 bytes per change); deleting rows every reader has passed
is safe (for `run --incremental`, the reader is the journal's mark), deleting
rows a reader has not read is detected (ids are contiguous) and costs it a
full pass. Ids only grow (AUTOINCREMENT) and SQLite has one writer at a time,
so a reader never sees an id before an earlier one is committed.
``meta.change_log`` holds a random token made with the log; dropping
``entries`` (a table rebuild) drops the triggers, and ``connect`` then
re-creates them with a new token, so a reader's cursor from before is void.

Version 1 (no ``not_before``, no change log) is read as is (``not_before``
None) and migrated in place by ``connect`` (every writer here opens with
it): ALTER TABLE ADD COLUMN, the log and its triggers, version 2, in one
transaction. A Tail needs version 2.

``ingest(db_path, sources, issuers, on_error)`` reads every non-sqlite source
with ``read_source`` and upserts its entries. Each source is staged in a
TEMP table (inserts in batches of BATCH rows), checked against the ledger,
then merged:

- an existing row is never un-revoked (revoked → good is an error, BR 4.9.13)
  and never changes notAfter or a known notBefore (another certificate under
  the same serial); a NULL not_before is filled in; kind only moves
  precertificate → certificate (RFC 6962 §3.1);
- ``on_error="stop"``: a source is all-or-nothing. Its first error (bad row,
  unusable source, conflict) aborts it with nothing of it committed; sources
  before it stay committed, sources after it are not read
  (``IngestReport.stopped``). Its merge is one transaction.
- ``on_error="quarantine"``: bad rows and conflicting rows are left out and
  reported; so is every row of a serial that a bad row names
  (``LedgerError.key``: a duplicate stated differently, a refused
  revocation) or that the source holds twice, so no line of it is taken
  as the serial's state. The rest is merged in transactions of BATCH rows,
  so a killed run keeps a prefix and a re-run completes it (the upsert is
  idempotent).

Rows are never deleted: an assigned serial stays assigned (BR 4.10.1).

``read_ledger(source, issuers)`` (``read_source`` for type ``sqlite``)
streams rows ordered by (issuer, serial) with ``fetchmany`` (bounded memory)
and validates each one; a bad row is a yielded LedgerError named
``<db>:<issuer>/<serial>``. A time not in the exact UTC ``Z`` form is an
error row (IdenTrust 2024 time-zone incident).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity
from ocspmint.ledger import read_source
from ocspmint.ledger.tail import Change
from ocspmint.model import UTC, Kind, LedgerEntry, LedgerError, Reason, RowRemoved, Status, check_serial, future_revocation, serial_hex

SCHEMA_VERSION = "2"
BATCH = 10_000
CACHE_KIB = 65_536  # a writer's page cache: rows land at random places of the (issuer, serial) b-tree
FETCH = 1_000
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_SERIAL = re.compile(r"[0-9a-f]{40}")
_KINDS: dict[object, Kind] = {k.value: k for k in Kind}
_STATUSES: dict[object, Status] = {s.value: s for s in Status}
_COLUMNS = "issuer, serial, kind, not_after, status, revoked_at, reason, source, not_before"
_V1_COLUMNS = "issuer, serial, kind, not_after, status, revoked_at, reason, source, NULL"

_META = "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
_ENTRIES = """
CREATE TABLE entries(
    issuer TEXT NOT NULL, serial TEXT NOT NULL, kind TEXT NOT NULL, not_after TEXT NOT NULL,
    status TEXT NOT NULL, revoked_at TEXT, reason INTEGER, source TEXT NOT NULL, not_before TEXT,
    PRIMARY KEY (issuer, serial)) WITHOUT ROWID
"""
_LOGGED = "issuer, serial, kind, not_after, status, revoked_at, reason"
_NOW = "CAST(strftime('%s', 'now') AS INTEGER)"  # unixepoch() needs SQLite 3.38 in every writer
_CHANGE_LOG = (  # IF NOT EXISTS: ``connect`` re-creates what a CA's table rebuild dropped
    "CREATE TABLE IF NOT EXISTS changes(id INTEGER PRIMARY KEY AUTOINCREMENT, issuer TEXT NOT NULL,"
    " serial TEXT NOT NULL, at INTEGER NOT NULL)",
    f"""CREATE TRIGGER IF NOT EXISTS entries_inserted AFTER INSERT ON entries BEGIN
        INSERT INTO changes(issuer, serial, at) VALUES (NEW.issuer, NEW.serial, {_NOW}); END""",
    f"""CREATE TRIGGER IF NOT EXISTS entries_updated AFTER UPDATE OF {_LOGGED} ON entries
        WHEN ({", ".join("OLD." + c for c in _LOGGED.split(", "))}) IS NOT ({", ".join("NEW." + c for c in _LOGGED.split(", "))})
        BEGIN INSERT INTO changes(issuer, serial, at) VALUES (NEW.issuer, NEW.serial, {_NOW}); END""",
    # a row deleted, or moved to another issuer/serial: its old key is logged, and has no row now
    f"""CREATE TRIGGER IF NOT EXISTS entries_deleted AFTER DELETE ON entries
        BEGIN INSERT INTO changes(issuer, serial, at) VALUES (OLD.issuer, OLD.serial, {_NOW}); END""",
    f"""CREATE TRIGGER IF NOT EXISTS entries_rekeyed AFTER UPDATE OF issuer, serial ON entries
        WHEN (OLD.issuer, OLD.serial) IS NOT (NEW.issuer, NEW.serial)
        BEGIN INSERT INTO changes(issuer, serial, at) VALUES (OLD.issuer, OLD.serial, {_NOW}); END""",
)
_LOG_OBJECTS = (("table", "changes", "changes"), ("trigger", "entries_inserted", "entries"),
                ("trigger", "entries_updated", "entries"), ("trigger", "entries_deleted", "entries"),
                ("trigger", "entries_rekeyed", "entries"))  # (type, name, table) the change log is made of
# What a reader needs: a ledger an earlier ocspmint wrote lacks the deletion triggers; it is read as
# before (deletions unlogged) until a writer (``ingest``) opens it and adds them.
_NEEDED_LOG_OBJECTS = _LOG_OBJECTS[:3]
LOG_KEY = "change_log"  # meta key: a token made anew whenever the change log is (re)created
# The newest change id ever given: AUTOINCREMENT keeps it in sqlite_sequence, even once its row is deleted.
_NEWEST = ("SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0),"
           " coalesce((SELECT max(id) FROM changes), 0))")
_STAGING = """
CREATE TEMP TABLE staging(
    issuer TEXT NOT NULL, serial TEXT NOT NULL, kind TEXT NOT NULL, not_after TEXT NOT NULL,
    status TEXT NOT NULL, revoked_at TEXT, reason INTEGER, source TEXT NOT NULL, not_before TEXT,
    dup INTEGER NOT NULL DEFAULT 0, bad INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (issuer, serial))
"""
# Existing rows a staged row must not overwrite: un-revocation or another
# certificate (notAfter or a known notBefore differs).
_CONFLICTS = """
SELECT s.rowid, s.issuer, s.serial, s.source, e.status, s.status, e.not_after, s.not_after, e.not_before, s.not_before
FROM staging s JOIN main.entries e ON e.issuer = s.issuer AND e.serial = s.serial
WHERE s.bad = 0 AND ((e.status = 'revoked' AND s.status = 'good') OR e.not_after <> s.not_after
                     OR e.not_before <> s.not_before)
ORDER BY s.rowid
"""
_MERGE = f"""
INSERT INTO main.entries({_COLUMNS})
SELECT {_COLUMNS} FROM staging WHERE bad = 0 AND rowid > ? AND rowid <= ?
ON CONFLICT(issuer, serial) DO UPDATE SET
    kind = CASE WHEN entries.kind = 'certificate' THEN 'certificate' ELSE excluded.kind END,
    status = excluded.status, revoked_at = excluded.revoked_at,
    reason = excluded.reason, source = excluded.source,
    not_before = coalesce(entries.not_before, excluded.not_before)
WHERE (entries.kind, entries.status, entries.revoked_at, entries.reason, entries.source, entries.not_before)
    IS NOT (CASE WHEN entries.kind = 'certificate' THEN 'certificate' ELSE excluded.kind END,
            excluded.status, excluded.revoked_at, excluded.reason, excluded.source,
            coalesce(entries.not_before, excluded.not_before))
"""
# Each key changed in (?, ?] once, in the order of its first change, with that change's ``at`` (a bare column
# beside min() comes from the min() row). SQLite groups and sorts with its own temporary storage, which
# spills to a file: no key is kept in Python however many changed. LEFT JOIN: entries is probed by key
# once per changed key; no row: deleted.
_CHANGED = f"""
SELECT c.at, c.issuer, c.serial, e.issuer IS NOT NULL, {", ".join("e." + c for c in _COLUMNS.split(", "))}
FROM (SELECT min(id) AS first, at, issuer, serial FROM changes WHERE id > ? AND id <= ? GROUP BY issuer, serial) c
LEFT JOIN entries e ON e.issuer = c.issuer AND e.serial = c.serial
ORDER BY c.first
"""
_LAST_CHANGE = "SELECT max(id) FROM changes WHERE id > ? AND id <= ?"  # the last change row a read takes


@dataclass
class SourceReport:
    """Counts for one source: ``read`` entries read, ``written`` rows inserted
    or changed, ``unchanged`` rows already identical, ``errors`` error rows,
    ``committed`` whether its rows were merged."""

    type: str
    path: str
    read: int = 0
    written: int = 0
    unchanged: int = 0
    errors: int = 0
    committed: bool = False


@dataclass
class IngestReport:
    """What ``ingest`` did: per-source counts, every LedgerError,
    ``stopped`` when on_error="stop" aborted the run, the paths of the
    ``skipped`` sqlite sources, the ledger written (``into``) and whether
    ingest ``created`` it."""

    sources: list[SourceReport] = field(default_factory=list)
    errors: list[LedgerError] = field(default_factory=list)
    stopped: bool = False
    skipped: list[str] = field(default_factory=list)
    into: str = ""
    created: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.stopped

    @property
    def written(self) -> int:
        return sum(s.written for s in self.sources)

    def text(self) -> str:
        """One line per source (a skipped one says why), what was done when
        there was nothing to read, then every error, then the verdict."""
        lines = [f"sqlite {path}: skipped (a sqlite source is a ledger ingest writes into, not one it reads)"
                 for path in self.skipped]
        lines += [
            f"{s.type} {s.path}: read {s.read}, written {s.written}, unchanged {s.unchanged}, "
            f"errors {s.errors}, {'committed' if s.committed else 'NOT committed'}"
            for s in self.sources
        ]
        if not self.sources:
            done = ("created, empty" if self.created
                    else "only opened for writing (which brings its schema and change log up to date)")
            lines.append(f"nothing ingested: the config has no openssl-index or certdir source; {self.into} was {done}")
        lines += [f"error: {e}" for e in self.errors]
        lines.append("stopped at the first error (on_error=stop)" if self.stopped else f"{len(self.errors)} error(s)")
        return "\n".join(lines)


def format_time(t: dt.datetime) -> str:
    """Aware UTC whole-second datetime → ``YYYY-MM-DDTHH:MM:SSZ``; ValueError otherwise."""
    if t.tzinfo is None or t.utcoffset() != dt.timedelta(0) or t.microsecond:
        raise ValueError(f"time {t.isoformat()} is not aware UTC with whole seconds")
    return t.strftime(TIME_FORMAT)


def parse_time(text: object) -> dt.datetime:
    """``YYYY-MM-DDTHH:MM:SSZ`` → aware UTC datetime; ValueError for anything else."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise ValueError(f"{text!r} is not a UTC time YYYY-MM-DDTHH:MM:SSZ")
    return dt.datetime.fromisoformat(text)  # the regex has checked the shape; "Z" gives UTC (~10x strptime)


def connect(db_path: str) -> sqlite3.Connection:
    """Open (creating if needed) a ledger for writing; autocommit mode, WAL,
    a page cache of CACHE_KIB KiB (SQLite's default is 2 MiB).

    A version-1 ledger is migrated to version 2 in place, in one transaction.
    Raises LedgerError when the file is not a ledger of version 1 or 2."""
    try:
        conn = sqlite3.connect(db_path, isolation_level=None)
    except sqlite3.Error as e:
        raise LedgerError(db_path, f"cannot open ledger database: {e}") from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            _create_or_migrate(conn, db_path)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except (sqlite3.Error, LedgerError) as e:
        conn.close()
        if isinstance(e, LedgerError):
            raise
        raise LedgerError(db_path, f"cannot open ledger database: {e}") from None
    return conn


def _create_or_migrate(conn: sqlite3.Connection, db_path: str) -> None:
    """Inside the caller's write transaction: bring the file to SCHEMA_VERSION."""
    conn.execute(_META)
    version = _version(conn)
    if version == SCHEMA_VERSION:
        if _log_missing(conn) is not None:  # a rebuilt entries table lost its triggers: changes went unlogged
            for ddl in _CHANGE_LOG:
                conn.execute(ddl)
            _new_log_token(conn)
        return
    if version is None:
        conn.execute(_ENTRIES)
    elif version == "1":
        conn.execute("ALTER TABLE entries ADD COLUMN not_before TEXT")
    else:
        raise LedgerError(db_path, f"ledger schema version {version!r}, expected 1 or {SCHEMA_VERSION}")
    for ddl in _CHANGE_LOG:
        conn.execute(ddl)
    _new_log_token(conn)
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))


def _new_log_token(conn: sqlite3.Connection) -> None:
    """A new ``meta.change_log`` token: a cursor into the log as it was before is void."""
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (LOG_KEY, os.urandom(8).hex()))


def _log_missing(conn: sqlite3.Connection, objects: tuple[tuple[str, str, str], ...] = _LOG_OBJECTS) -> str | None:
    """What of the change log's ``objects`` (``changes`` and its triggers on ``entries``) is missing, or None."""
    have = set(conn.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('table', 'trigger')"))
    missing = [f"{kind} {name}" for kind, name, table in objects if (kind, name, table) not in have]
    return ", ".join(missing) or None


def _version(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else str(row[0])


def _open_reader(path: str, versions: tuple[str, ...]) -> tuple[sqlite3.Connection, str]:
    """A read-only connection and the schema version (one of ``versions``).
    Raises LedgerError when the file is missing, unreadable or of another version."""
    if not os.path.isfile(path):
        raise LedgerError(path, "ledger database does not exist")
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise LedgerError(path, f"cannot open ledger database: {e}") from None
    try:
        version = _version(conn)
    except sqlite3.Error as e:
        conn.close()
        raise LedgerError(path, f"cannot read ledger database: {e}") from None
    if version not in versions:
        conn.close()
        hint = "; open it for writing once (ocspmint ingest) to migrate it" if version == "1" else ""
        raise LedgerError(path, f"ledger schema version {version!r}, expected {' or '.join(versions)}{hint}")
    return conn, version


_Row = tuple[str, str, str, str, str, str | None, int | None, str, str | None]


def _row(e: LedgerEntry) -> _Row:
    revoked = format_time(e.revoked_at) if e.revoked_at is not None else None
    reason = int(e.reason) if e.reason is not None else None
    not_before = format_time(e.not_before) if e.not_before is not None else None
    return (e.issuer, serial_hex(e.serial), e.kind.value, format_time(e.not_after), e.status.value, revoked, reason,
            e.source, not_before)


def ingest(
    db_path: str, sources: Iterable[Source], issuers: Mapping[str, IssuerIdentity], on_error: str = "stop"
) -> IngestReport:
    """Upsert the entries of every non-sqlite source into the ledger
    (sources of type sqlite are skipped: listed in ``skipped``, no
    SourceReport). With none to read, the ledger is still opened for
    writing (``connect``: created, or migrated and its change log made whole).

    ``on_error`` is "stop" or "quarantine" (see module docstring for what is
    committed). Returns an IngestReport; raises LedgerError when the
    database itself cannot be opened or fails while written (locked by
    another writer past SQLite's 5 s busy timeout, disk full), ValueError
    for a bad ``on_error``.
    """
    if on_error not in ("stop", "quarantine"):
        raise ValueError(f"on_error must be 'stop' or 'quarantine', not {on_error!r}")
    report = IngestReport(into=db_path, created=not os.path.exists(db_path))
    conn = connect(db_path)
    try:
        for source in sources:
            if source.type == "sqlite":
                report.skipped.append(source.path)
                continue
            sr = SourceReport(type=source.type, path=source.path)
            report.sources.append(sr)
            try:
                if not _ingest_one(conn, db_path, source, issuers, on_error == "stop", sr, report.errors):
                    report.stopped = True
                    break
            except sqlite3.Error as e:  # "database is locked": another writer kept it past the busy timeout
                raise LedgerError(db_path, f"ledger database error while ingesting {source.path}: {e}; what that "
                                           "source had merged is kept only with on_error = \"quarantine\"") from None
    finally:
        conn.close()
    return report


def _ingest_one(
    conn: sqlite3.Connection,
    db_path: str,
    source: Source,
    issuers: Mapping[str, IssuerIdentity],
    stop: bool,
    sr: SourceReport,
    errors: list[LedgerError],
) -> bool:
    """Stage, check and merge one source; False when ``stop`` and it failed."""
    conn.execute("DROP TABLE IF EXISTS temp.staging")
    conn.execute(_STAGING)
    try:
        staged_ok = _stage(conn, source, issuers, stop, sr, errors)
        if staged_ok is not True:
            return staged_ok is None  # None: unusable source under quarantine, go on
        for rowid, issuer, serial, where, old_status, new_status, old_na, new_na, old_nb, new_nb in conn.execute(
            _CONFLICTS
        ).fetchall():
            problems = ["would un-revoke it (BR 4.9.13)"] if (old_status, new_status) == ("revoked", "good") else []
            problems += [f"changes notAfter {old_na} → {new_na}"] if old_na != new_na else []
            problems += [f"changes notBefore {old_nb} → {new_nb}"] if None not in (old_nb, new_nb) and old_nb != new_nb else []
            what = "; ".join(problems)
            errors.append(LedgerError(where, f"conflicts with ledger row {db_path}:{issuer}/{serial}: {what}"))
            sr.errors += 1
            if stop:
                return False
            conn.execute("UPDATE staging SET bad = 1 WHERE rowid = ?", (rowid,))
        staged = conn.execute("SELECT count(*), coalesce(max(rowid), 0) FROM staging WHERE bad = 0").fetchone()
        step = staged[1] + 1 if stop else BATCH  # stop: one transaction for the whole source
        for low in range(0, staged[1], step):
            conn.execute("BEGIN IMMEDIATE")
            try:
                merged = conn.execute(_MERGE, (low, low + step)).rowcount  # not counting the change log's rows
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            sr.written += merged
        sr.unchanged = staged[0] - sr.written
        sr.committed = True
        return True
    finally:
        conn.execute("DROP TABLE IF EXISTS temp.staging")


def _stage(
    conn: sqlite3.Connection,
    source: Source,
    issuers: Mapping[str, IssuerIdentity],
    stop: bool,
    sr: SourceReport,
    errors: list[LedgerError],
) -> bool | None:
    """Read the source into temp.staging. True: merge it; False: ``stop``
    met an error; None: the source is unusable (raised), merge nothing.
    Rows of a serial a bad row names, or read twice, are marked bad."""
    insert = f"INSERT INTO staging({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(issuer, serial) DO UPDATE SET dup = dup + 1"
    batch: list[tuple[object, ...]] = []
    named: set[tuple[str, str]] = set()  # (issuer, serial hex) of bad rows that name a serial
    try:
        for item in read_source(source, issuers):
            if isinstance(item, LedgerEntry):
                try:
                    batch.append(_row(item))
                    sr.read += 1
                except ValueError as e:
                    item = LedgerError(item.source, str(e))
            if isinstance(item, LedgerError):
                errors.append(item)
                sr.errors += 1
                if stop:
                    return False
                if item.key is not None:
                    named.add((item.key[0], serial_hex(item.key[1])))
            if len(batch) >= BATCH:
                _insert_batch(conn, insert, batch)
    except LedgerError as e:  # the whole source is unusable
        errors.append(e)
        sr.errors += 1
        return False if stop else None
    _insert_batch(conn, insert, batch)
    for issuer, serial, where in conn.execute("SELECT issuer, serial, source FROM staging WHERE dup > 0").fetchall():
        errors.append(LedgerError(where, f"{issuer}/{serial} read more than once from this source; none of it taken"))
        sr.errors += 1
        if stop:
            return False
    conn.execute("BEGIN")
    conn.execute("UPDATE staging SET bad = 1 WHERE dup > 0")
    conn.executemany("UPDATE staging SET bad = 1 WHERE issuer = ? AND serial = ?", sorted(named))
    conn.execute("COMMIT")
    return True


def _insert_batch(conn: sqlite3.Connection, insert: str, batch: list[tuple[object, ...]]) -> None:
    """One transaction per batch (temp.staging only: no lock on the ledger)."""
    conn.execute("BEGIN")
    conn.executemany(insert, batch)
    conn.execute("COMMIT")
    batch.clear()


def read_ledger(source: Source, issuers: Mapping[str, IssuerIdentity]) -> Iterator[LedgerEntry | LedgerError]:
    """Stream ledger rows ordered by (issuer, serial), FETCH rows at a time.

    Reads schema versions 1 (``not_before`` None) and 2. Raises LedgerError
    when the database is missing, unreadable or of another schema version.
    Yields LedgerError ``<db>:<issuer>/<serial>`` for an unknown issuer, bad
    serial, kind, status, time or reason.
    """
    path = source.path
    conn, version = _open_reader(path, ("1", SCHEMA_VERSION))
    try:
        try:
            cur = conn.execute(f"SELECT {_COLUMNS if version == SCHEMA_VERSION else _V1_COLUMNS} FROM entries"
                               " ORDER BY issuer, serial")
        except sqlite3.Error as e:
            raise LedgerError(path, f"cannot read ledger database: {e}") from None
        for rows in _batches(cur, path):
            for row in rows:
                yield _entry(row, path, issuers)
    finally:
        conn.close()


def _batches(cur: sqlite3.Cursor, path: str) -> Iterator[list[tuple[object, ...]]]:
    """``cur``'s rows, FETCH at a time; LedgerError for a read failure."""
    while True:
        try:
            rows = cur.fetchmany(FETCH)
        except sqlite3.Error as e:
            raise LedgerError(path, f"cannot read ledger database: {e}") from None
        if not rows:
            return
        yield rows


class ChangeLogError(LedgerError):
    """The change log cannot be followed (incomplete, or not continuing from
    a cursor): only a full pass of the ledger gives its state."""


class Cursor(NamedTuple):
    """A durable SqliteTail position (`ocspmint run --incremental` keeps one
    between runs). ``position``: the last ``changes.id`` seen; ``change``:
    ``<issuer>/<serial>@<at>`` of that changes row ("" when there is none),
    None when not known (a bare id); ``log``: the ledger's ``meta.change_log``
    token ("" when it has none), None when not known."""

    position: int
    change: str | None = None
    log: str | None = None


class SqliteTail:
    """Incremental reader of the ledger's change log (contract: ``ledger.tail.Tail``).

    Remembers the highest ``changes.id`` seen. Each call runs one query: the
    ``changes`` rows after it (a range on the integer primary key), grouped
    by key, each key joined to its ``entries`` row by primary key, so the
    rows examined are the changes since the last call, whatever the
    ledger's size. A serial changed several times comes once, in the order
    of its first change, with that change's ``at`` as ``seen_at``; SQLite
    groups and orders them in its temporary storage (spilled to a file), so
    memory does not grow with the changes read. Ids grow with every commit
    (AUTOINCREMENT, one writer at a time), so no committed change is
    skipped. ``unread`` tells, without reading them, how many change rows
    follow the position. Needs schema version 2.

    The log must be complete and continue from the position, or no change
    is read (LedgerError; only a full pass of the ledger is then right):
    ``changes`` and its triggers exist; its newest id (``sqlite_sequence``)
    is not below the position and, past it, the next id is there (ids are
    contiguous: rows after the position were not deleted); the change row
    at the position is the one seen (a ledger restored from a backup, or
    another file, reuses ids for other changes); ``meta.change_log`` is the
    token seen (``connect`` makes a new one when it re-creates dropped
    triggers: what was written meanwhile is not in the log). Rows at or
    before the position may be deleted (docs/ledger.md).
    """

    def __init__(self, source: Source, issuers: Mapping[str, IssuerIdentity]) -> None:
        self._path = source.path
        self._issuers = issuers
        self._cursor = Cursor(0)
        self._newest = 0  # the log's newest id at the last start() / changes()

    @property
    def cursor(self) -> Cursor:
        """The position with what proves the log still continues from it: a
        durable cursor (`ocspmint run --incremental`); resume with ``start``."""
        return self._cursor

    @property
    def unread(self) -> int:
        """How many change rows follow the position, as of the last
        ``start`` / ``changes``: the log's newest id minus the position (ids
        are contiguous past it, ``start`` checks that), no row read. An upper
        bound on the entries the next ``changes`` yields (a serial changed
        several times comes once), but for what is written meanwhile."""
        return max(self._newest - self._cursor.position, 0)

    def start(self, position: Cursor | None = None) -> None:
        """Remember the newest change, or resume after ``position`` (a
        former ``cursor``). Raises LedgerError when the
        database is missing, unreadable or not of schema version 2;
        ChangeLogError (a LedgerError) when its change log is incomplete or
        does not continue from ``position`` (see the class docstring)."""
        conn, _ = _open_reader(self._path, (SCHEMA_VERSION,))
        try:
            conn.execute("BEGIN")  # one snapshot
            if position is None:
                self._check_log(conn, None)
                self._newest = conn.execute(_NEWEST).fetchone()[0]
                self._cursor = Cursor(self._newest, self._change(conn, self._newest), self._token(conn))
            else:
                self._cursor = self._check_log(conn, position)
                self._newest = conn.execute(_NEWEST).fetchone()[0]
        except sqlite3.Error as e:
            raise LedgerError(self._path, f"cannot read ledger database: {e}") from None
        finally:
            conn.close()

    def _check_log(self, conn: sqlite3.Connection, cursor: Cursor | None) -> Cursor:
        """``cursor`` completed from the database after the class docstring's
        checks (only that the log is complete when None); ChangeLogError otherwise."""
        path = self._path
        if (missing := _log_missing(conn, _NEEDED_LOG_OBJECTS)) is not None:
            raise ChangeLogError(path, f"the change log is incomplete (missing: {missing}; a rebuilt entries table "
                                       "loses its triggers), so changes are not all logged; open the ledger for "
                                       "writing once (ocspmint ingest) to re-create it")
        if cursor is None:
            return self._cursor
        lost = "; read the whole ledger (a full pass)"
        newest, token = conn.execute(_NEWEST).fetchone()[0], self._token(conn)
        if newest < cursor.position:
            raise ChangeLogError(path, f"the change log ends at id {newest}, before id {cursor.position} read already: "
                                       f"the ledger was replaced or restored from a backup{lost}")
        if cursor.log is not None and token != cursor.log:
            raise ChangeLogError(path, f"the change log is not the one read up to id {cursor.position}: the ledger "
                                       "was replaced, or its log re-created after its triggers were dropped (what "
                                       f"was written meanwhile is in no log){lost}")
        change = self._change(conn, cursor.position)
        if cursor.change and change and change != cursor.change:
            raise ChangeLogError(path, f"change id {cursor.position} is {change} now, not {cursor.change} as read: "
                                       f"the ledger was replaced or restored from a backup{lost}")
        if newest > cursor.position and self._change(conn, cursor.position + 1) == "":
            raise ChangeLogError(path, f"change rows after id {cursor.position} (up to {newest}) were deleted before "
                                       f"being read{lost}")
        return Cursor(cursor.position, change or cursor.change, token)

    @staticmethod
    def _change(conn: sqlite3.Connection, change_id: int) -> str:
        row = conn.execute("SELECT issuer, serial, at FROM changes WHERE id = ?", (change_id,)).fetchone()
        return "" if row is None else f"{row[0]}/{row[1]}@{row[2]}"

    @staticmethod
    def _token(conn: sqlite3.Connection) -> str:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (LOG_KEY,)).fetchone()
        return "" if row is None else str(row[0])

    def changes(self, upto: int | None = None) -> Iterator[Change]:
        """Entries changed since the last call, ``seen_at`` = ``changes.at``;
        with ``upto``, only those of change ids up to it (the position then
        stops there, and the next call goes on from it). Raises LedgerError
        (on first ``next()``) as ``start`` does."""
        path = self._path
        conn, _ = _open_reader(path, (SCHEMA_VERSION,))
        try:
            try:
                conn.execute("BEGIN")  # the checks and the read see one snapshot
                cursor = self._check_log(conn, self._cursor)
                newest = conn.execute(_NEWEST).fetchone()[0]
                bounds = (cursor.position, newest if upto is None else min(newest, upto))
                last = conn.execute(_LAST_CHANGE, bounds).fetchone()[0]
                if last is not None:
                    cursor = Cursor(last, self._change(conn, last), cursor.log)
                cur = conn.execute(_CHANGED, bounds)
            except sqlite3.Error as e:
                raise LedgerError(path, f"cannot read ledger database: {e}") from None
            for rows in _batches(cur, path):
                for at, issuer, serial, present, *row in rows:
                    item = _entry(tuple(row), path, self._issuers) if present else _deleted(path, issuer, serial)
                    yield Change(item, dt.datetime.fromtimestamp(at, UTC))
            self._cursor, self._newest = cursor, newest
        finally:
            conn.close()


def _deleted(db: str, issuer: str, serial: str) -> RowRemoved:
    """A change-log key whose ``entries`` row is gone."""
    key = (issuer, int(serial, 16)) if _SERIAL.fullmatch(serial) else None
    return RowRemoved(f"{db}:{issuer}/{serial}", "no longer in the ledger (its row was deleted, or its issuer or "
                                                  "serial changed): its response is no longer re-signed and is "
                                                  "served until its nextUpdate; a CA does not delete what it "
                                                  "issued: restore the row, or remove the response with "
                                                  "`ocspmint audit --fix`", key)


def _entry(row: tuple[object, ...], db: str, issuers: Mapping[str, IssuerIdentity]) -> LedgerEntry | LedgerError:
    issuer, serial, kind, not_after, status, revoked_at, reason, _source, not_before = row
    where = f"{db}:{issuer}/{serial}"
    number: int | None = None
    try:
        if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
            raise ValueError(f"serial {serial!r} is not 40 lowercase hex digits")
        number = check_serial(int(serial, 16), where)
        if issuer not in issuers:
            raise ValueError(f"issuer {issuer!r} is not configured")
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if status not in _STATUSES:
            raise ValueError(f"unknown status {status!r}")
        try:
            na = parse_time(not_after)
        except ValueError as e:
            raise ValueError(f"not_after {e}") from None
        if _STATUSES[status] is Status.GOOD:
            if revoked_at is not None or reason is not None:
                raise ValueError("status good with a revocation time or reason")
            rev_at, why = None, None
        else:
            try:
                rev_at = parse_time(revoked_at)
            except ValueError as e:
                raise ValueError(f"revoked_at {e}") from None
            if problem := future_revocation("revoked_at", rev_at):
                raise ValueError(problem)
            why = _reason(reason)
        try:
            nb = None if not_before is None else parse_time(not_before)
        except ValueError as e:
            raise ValueError(f"not_before {e}") from None
        return LedgerEntry(
            issuer=str(issuer), serial=number, kind=_KINDS[kind], not_after=na,
            status=_STATUSES[status], revoked_at=rev_at, reason=why, source=where, not_before=nb,
        )
    except (LedgerError, ValueError) as e:  # a row whose serial parses names it: that serial is published from no row
        return LedgerError(where, e.message if isinstance(e, LedgerError) else str(e),
                           None if number is None else (str(issuer), number))


def _reason(value: object) -> Reason | None:
    if value is None:
        return None
    if type(value) is not int or value not in Reason._value2member_map_:
        raise ValueError(f"reason {value!r} is not a CRLReason code")
    reason = Reason(value)
    if reason in (Reason.unspecified, Reason.certificateHold, Reason.removeFromCRL):
        raise ValueError(f"reason {value} ({reason.name}) must not be stored (NULL for unspecified; BR 4.9.13, 7.3.2)")
    return reason


def write_entries(db_path: str, entries: Iterable[LedgerEntry]) -> int:
    """Upsert ``entries`` as they are (no merge checks), in transactions of
    BATCH rows; for issuance systems that write the ledger directly and for
    synthetic ledgers in tests and benchmarks. Returns the rows written."""
    conn = connect(db_path)
    written, rows = 0, []
    try:
        for e in entries:
            rows.append(_row(e))
            if len(rows) >= BATCH:
                written += _upsert(conn, rows)
                rows = []
        return written + _upsert(conn, rows)
    finally:
        conn.close()


def _upsert(conn: sqlite3.Connection, rows: list[_Row]) -> int:
    with conn:
        conn.execute("BEGIN")
        conn.executemany(f"INSERT OR REPLACE INTO entries({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    return len(rows)
