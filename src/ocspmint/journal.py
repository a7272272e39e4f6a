"""Journal: the durable record of what is published, per (issuer, serial).

SQLite (WAL, synchronous=NORMAL) at ``<state_dir>/journal.sqlite``. A row
is written only after the store made the object durable (``flush()``), in
one transaction per batch, so a journaled object is always in the store,
even after a power loss. A run killed at any instant resumes without loss:
an object written but not journaled is signed and written again (same key,
replaced atomically). WAL with NORMAL survives a killed process; a power
loss can only drop the newest journal rows, whose serials are then
re-signed: the safe direction.

Schema ``published``: issuer TEXT, serial TEXT (040x hex), this_update /
next_update INTEGER (Unix seconds, UTC), status TEXT, revoked_at INTEGER
NULL, reason INTEGER NULL, signer TEXT (hex SHA-1 of the signing key),
sha256 BLOB (of the published DER), why TEXT (the planner's reason, or a
reissue's ``--reason``), kind TEXT and not_after INTEGER (of the ledger
entry, so `ocspmint refresh` can re-sign from the journal alone),
refresh_at INTEGER NULL (when `ocspmint refresh` re-signs it,
planner.refresh_at; moved ``ROUTINE_LEASE`` on when a refresh tick takes
it, ``due_by``; NULL once the certificate expired), produced_at
INTEGER (producedAt: a reissue resumes by it); primary key (issuer,
serial); index on refresh_at. Files made before the last five columns existed are migrated in place (``unscheduled`` lists the rows
still without refresh_at).

Schema ``jobs`` (`ocspmint reissue`): id, reason, selector (JSON), started,
finished (NULL while unfinished: a re-run resumes it), published.
Schema ``runs``: one row per run (started, seconds, published), the
measured rate `reissue --dry-run` estimates with. Schema ``meta``:
``clock`` is the latest wall-clock time any run saw; a clock earlier than
it means the clock jumped backwards (``ClockError``). Schema
``clock_resets``: at, recorded (Unix seconds), reason: every time an
operator accepted a clock earlier than ``clock`` (`ocspmint reissue
--clock-was-fast`, ``accept_clock``; docs/faults.md).

Schema ``purges`` (the durable purge queue, docs/purge.md): target TEXT
(a purge target's name), issuer TEXT, serial TEXT, queued INTEGER (Unix
seconds), attempts INTEGER, last_error TEXT; primary key (target, issuer,
serial). Rows are queued in the same transaction as the ``published`` rows
whose served status changed, and deleted when the target acknowledged the
purge, so a purge is never lost between publication and the cache.

Errors: SQLite's own (another connection holding the write lock past
``BUSY_SECONDS``: "database is locked"; "database or disk is full"; a
damaged file) are raised as ``JournalError``, whose message names the
journal file and what to do. Only one ocspmint writes a state folder at a
time (``ocspmint.statelock``), so a lock held that long is another program
(an ``sqlite3`` shell, a backup tool).
"""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Self, TypeVar

import msgspec

from ocspmint.model import UTC, LedgerEntry, Reason, Status, serial_hex, utc_now

SCHEMA = """
CREATE TABLE IF NOT EXISTS published (
  issuer TEXT NOT NULL, serial TEXT NOT NULL,
  this_update INTEGER NOT NULL, next_update INTEGER NOT NULL,
  status TEXT NOT NULL, revoked_at INTEGER, reason INTEGER,
  signer TEXT NOT NULL, sha256 BLOB NOT NULL,
  PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS purges (
  target TEXT NOT NULL, issuer TEXT NOT NULL, serial TEXT NOT NULL,
  queued INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
  PRIMARY KEY (target, issuer, serial)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY, reason TEXT NOT NULL, selector TEXT NOT NULL,
  started INTEGER NOT NULL, finished INTEGER, published INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS runs (
  started INTEGER NOT NULL, seconds REAL NOT NULL, published INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clock_resets (at INTEGER NOT NULL, recorded INTEGER NOT NULL, reason TEXT NOT NULL);
"""
ADDED_COLUMNS = {"why": "TEXT", "kind": "TEXT", "not_after": "INTEGER", "refresh_at": "INTEGER", "produced_at": "INTEGER"}
CLOCK_SLACK = dt.timedelta(seconds=2)
ROUTINE_LEASE = dt.timedelta(seconds=60)  # ``due_by``: a record taken is due again this long after, unless re-signed
CACHE_KIB = 64 * 1024  # page cache: random-serial upserts touch b-tree pages all over the journal
# WAL pages before a checkpoint copies them into the file (and fsyncs it):
# a 4,096-row transaction of random serials dirties ~2 pages per row, so
# SQLite's default (1,000) checkpointed after every one; 64 MiB of WAL cut
# journaling from ~53 to ~47 µs a row in a 1M-row journal (bench/scale_causes.py).
WAL_CHECKPOINT_PAGES = 16384
BUSY_SECONDS = 5.0  # how long a statement waits for another connection's write lock
CLOCK_REMEDY = ("if it ran fast before and is right now, see docs/faults.md: "
                "ocspmint reissue --clock-was-fast --reason WHY")


class ClockError(Exception):
    """The wall clock is earlier than a time a previous run recorded."""


class JournalError(Exception):
    """The journal cannot be read or written; the message names the file."""


def _why(e: sqlite3.Error) -> str:
    text = str(e)
    if "locked" in text or "busy" in text:
        return (f"{text}: another program kept the journal locked for more than {BUSY_SECONDS:.0f} s "
                "(an sqlite3 shell, a backup?); end it, then run again")
    if "full" in text:
        return f"{text}: free space on its file system, then run again"
    return text


_T = TypeVar("_T")


def _named(doing: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Raise SQLite's run-time errors of a Journal method as JournalError
    naming the file (and what the method was ``doing``), not a traceback.
    IntegrityError and ProgrammingError are bugs and pass unchanged."""
    def wrap(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def named(self: Journal, *args: object, **kw: object) -> _T:
            try:
                return method(self, *args, **kw)
            except sqlite3.DatabaseError as e:  # OperationalError among them
                if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                    raise
                what = "cannot open journal" if doing == "open" else f"journal {doing} failed"
                raise JournalError(f"{self.path}: {what}: {_why(e)}") from None
        return named
    return wrap


class Job(msgspec.Struct, frozen=True):
    """A reissue job: ``since`` its start; entries re-signed at or after it are done."""

    id: int
    reason: str
    selector: str
    since: dt.datetime
    resumed: bool


class Record(msgspec.Struct, frozen=True):
    """What was published for one serial (times aware UTC)."""

    issuer: str
    serial: int
    this_update: dt.datetime
    next_update: dt.datetime
    status: str
    revoked_at: dt.datetime | None
    reason: int | None
    signer: str
    sha256: bytes
    why: str = ""
    kind: str = ""
    not_after: dt.datetime | None = None
    refresh_at: dt.datetime | None = None
    produced_at: dt.datetime | None = None

    def matches(self, entry: LedgerEntry) -> bool:
        """True when this record states the entry's current status."""
        reason = None if entry.reason is None else int(entry.reason)
        return self.status == entry.status.value and self.revoked_at == entry.revoked_at and self.reason == reason


def _ts(t: dt.datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def _dt(v: int | None) -> dt.datetime | None:
    return None if v is None else dt.datetime.fromtimestamp(v, UTC)


_COLUMNS = "issuer, serial, this_update, next_update, status, revoked_at, reason, signer, sha256, why, kind, not_after, refresh_at, produced_at"


def _record(row: tuple) -> Record:
    issuer, serial, tu, nu, status, revoked_at, reason, signer, sha256, why, kind, not_after, refresh_at, produced = row
    return Record(issuer, int(serial, 16), _dt(tu), _dt(nu), status, _dt(revoked_at), reason, signer, sha256,
                  why or "", kind or "", _dt(not_after), _dt(refresh_at), _dt(produced))


# a candidate of the sweep no row of any source holds, expired or not
_ABSENT = "NOT EXISTS (SELECT 1 FROM late l WHERE l.issuer = c.issuer AND l.serial = c.serial)"
KEYS_FLUSH = 8192  # keys buffered before one INSERT transaction
KEYS_CACHE_KIB = 16 * 1024  # a Scratch database's page cache, also the sort's memory: beyond it, temporary files
STATEMENTS_BATCH = 4096  # keys looked up in one query (2 variables each; SQLite allows 32,766)


class Scratch:
    """A private temporary SQLite database (``sqlite3.connect("")``) for
    what one ledger pass must remember of every row, kept by SQLite rather
    than in Python objects (10M rows must stay within the memory target):
    held in a KEYS_CACHE_KIB page cache, spilled beyond it to an unlinked
    file of SQLite's temporary folder (SQLITE_TMPDIR, else TMPDIR, else
    /var/tmp or /tmp; never the state folder), gone when the connection
    closes, also after a kill. ``schema`` creates its tables; ``what``
    names it in errors. Use it as a context manager, from one thread at a
    time. Raises JournalError when SQLite fails (a full temporary folder)."""

    what = "a ledger pass's scratch"

    def __init__(self, schema: str) -> None:
        self._db = sqlite3.connect("", isolation_level=None, timeout=BUSY_SECONDS, check_same_thread=False)
        try:
            self._run(f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-{KEYS_CACHE_KIB}; {schema}")
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _error(self, e: sqlite3.Error) -> JournalError:
        return JournalError(f"{self.what} (a temporary database): {_why(e)}")

    def _run(self, script: str) -> None:
        try:
            self._db.executescript(script)
        except sqlite3.Error as e:
            raise self._error(e) from None

    def _write(self, *inserts: tuple[str, list[tuple]]) -> None:
        """Each (statement, rows) of ``inserts``, in one transaction."""
        try:
            with self._db:
                self._db.execute("BEGIN")
                for sql, rows in inserts:
                    self._db.executemany(sql, rows)
        except sqlite3.Error as e:
            raise self._error(e) from None

    def _read(self, sql: str, params: Sequence[object]) -> list[tuple]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None


class FirstStatements(Scratch):
    """The first statement of each (issuer, serial) key a full pass over
    several sources read (``pipeline.ledger_entries`` compares each later
    entry of the key with it: a serial two sources state differently is
    published from neither), in a Scratch database rather than a dict of
    every entry.

    Table ``stated``: issuer, serial (040x hex), status, revoked_at (Unix
    seconds), reason (CRLReason code), source (the entry's ``path:line``);
    primary key (issuer, serial). Memory: one batch of STATEMENTS_BATCH
    entries and the page cache. Temporary disk: the key, the statement and
    the source text of each key (~130 bytes for an index.txt row).
    Cost and measurements: docs/ledger.md ("several sources")."""

    what = "the pass's first statements"

    def __init__(self) -> None:
        super().__init__("CREATE TABLE stated (issuer TEXT NOT NULL, serial TEXT NOT NULL, status TEXT NOT NULL, "
                         "revoked_at INTEGER, reason INTEGER, source TEXT NOT NULL, "
                         "PRIMARY KEY (issuer, serial)) WITHOUT ROWID;")

    def first(self, entries: list[LedgerEntry]) -> list[LedgerEntry]:
        """For each of ``entries`` (at most STATEMENTS_BATCH, in the order
        read), the entry that first stated its key: the entry itself when
        no entry of an earlier call, nor one before it in ``entries``, did
        (it is recorded), else that one's statement (status, revoked_at,
        reason) and source, with this entry's other fields. One lookup
        query and one insert transaction. Raises JournalError."""
        if not entries:
            return []
        keys = [(e.issuer, serial_hex(e.serial)) for e in entries]
        rows = self._read(f"SELECT s.issuer, s.serial, s.status, s.revoked_at, s.reason, s.source FROM (VALUES "
                          f"{','.join(['(?,?)'] * len(keys))}) k CROSS JOIN stated s ON s.issuer = k.column1 "
                          "AND s.serial = k.column2", [part for key in keys for part in key])  # a PK probe per key
        found = {(issuer, serial): statement for issuer, serial, *statement in rows}
        firsts: list[LedgerEntry] = []
        new: dict[tuple[str, str], LedgerEntry] = {}
        for entry, key in zip(entries, keys):
            if (stated := found.get(key)) is None:
                firsts.append(new.setdefault(key, entry))
                continue
            status, revoked_at, reason, source = stated
            firsts.append(msgspec.structs.replace(entry, status=Status(status), revoked_at=_dt(revoked_at),
                                                  reason=None if reason is None else Reason(reason), source=source))
        self._write(("INSERT INTO stated VALUES (?, ?, ?, ?, ?, ?)",
                     [(*key, e.status.value, _ts(e.revoked_at), None if e.reason is None else int(e.reason), e.source)
                      for key, e in new.items()]))
        return firsts


WITHHELD_EXAMPLES = 3  # absent serials a withheld sweep names


class Withheld(NamedTuple):
    """An issuer whose sweep forgot nothing (``Journal.forget_absent``'s
    guard): ``absent`` of its ``scheduled`` records (unexpired) no source
    holds, more than ``limit``; ``examples``: the first absent serials."""

    issuer: str
    absent: int
    scheduled: int
    limit: int
    examples: list[int]


class Swept(NamedTuple):
    """What one sweep did: the (issuer, serial) keys it took off the
    schedule, in key order, and the issuers it left alone (``Withheld``)."""

    forgotten: list[tuple[str, int]]
    withheld: list[Withheld]


class LedgerKeys(Scratch):
    """The (issuer, serial) keys one full ledger pass read from the sources
    ``Journal.forget_absent`` cannot ATTACH (``openssl-index``,
    ``certdir``), for the sweep after the pass, kept by SQLite rather than
    in a Python set of every key (10M rows must stay within the memory
    target).

    A Scratch database: ``add`` appends in transactions of KEYS_FLUSH keys
    to one of two unindexed tables: ``held`` (entries unexpired at
    ``now``, and rows in error that name a serial) and ``expired``
    (entries expired at ``now``, with their notAfter: only ever scanned,
    and only when the sweep has candidates, so a ledger of mostly expired
    rows pays an append each). ``sweep`` sorts ``held`` into a table in
    key order and probes it.

    Memory: KEYS_FLUSH keys and the page cache (+18 MiB peak RSS for a
    1M-row pass). Temporary disk: ~62 bytes per held key, twice once
    sorted, plus the sort's passing files; ~65 per expired key. Cost at
    1M index.txt rows: 5.1 s (docs/ledger.md, "the sweep"). Raises
    JournalError when SQLite fails (a full temporary folder)."""

    what = "the sweep's ledger keys"

    def __init__(self, now: dt.datetime) -> None:
        self._now = now
        self._held: list[tuple[str, str]] = []
        self._expired: list[tuple[str, str, int]] = []
        super().__init__("""
            CREATE TABLE held (issuer TEXT NOT NULL, serial TEXT NOT NULL);
            CREATE TABLE expired (issuer TEXT NOT NULL, serial TEXT NOT NULL, not_after INTEGER NOT NULL);""")

    def add(self, issuer: str, serial: int, not_after: dt.datetime | None) -> None:
        """Record a key a source holds: an entry's, with its ``not_after``,
        or a row in error naming it (None: held, its state is unknown,
        not absent)."""
        if not_after is not None and not_after <= self._now:
            self._expired.append((issuer, serial_hex(serial), int(not_after.timestamp())))
        else:
            self._held.append((issuer, serial_hex(serial)))
        if len(self._held) + len(self._expired) >= KEYS_FLUSH:
            self._flush()

    def _flush(self) -> None:
        self._write(("INSERT INTO held VALUES (?, ?)", self._held), ("INSERT INTO expired VALUES (?, ?, ?)", self._expired))
        self._held, self._expired = [], []

    def sweep(self, journal: Path, ledgers: list[str], issuers: Collection[str], now: dt.datetime) -> dict[str, int]:
        """Find the scheduled records of ``issuers`` in the journal file
        ``journal`` whose notAfter is after ``now`` that no source holds
        (``absent``), and those whose rows all expired at ``now``
        (``expired``); returns the number of absent records per issuer
        (only issuers with some). See ``Journal.forget_absent``, which acts
        on them.

        Reads the journal and the SQLite ``ledgers`` (ATTACHed here, as
        many at a time as SQLite allows beside the journal: 9 with its
        default SQLITE_MAX_ATTACHED of 10), writes nothing to them. Cost:
        the held keys sorted once; one pass over the scheduled records in
        key order, each a primary-key probe into the sorted keys and into
        the first 9 ledgers; each further 9 ledgers, a probe per record
        still not held; then, only if there are candidates, one scan of
        the expired keys. Raises JournalError naming the journal."""
        self._flush()
        try:
            self._db.execute("ATTACH DATABASE ? AS journal", (str(journal),))
            per = self._db.getlimit(sqlite3.SQLITE_LIMIT_ATTACHED) - 1
            self._candidates([ledgers[n:n + per] for n in range(0, len(ledgers), per)] or [[]], issuers, now)
            return dict(self._db.execute(f"SELECT c.issuer, count(*) FROM candidates c WHERE {_ABSENT} GROUP BY c.issuer"))
        except sqlite3.Error as e:
            raise JournalError(f"{journal}: journal sweep failed: {_why(e)}") from None

    def absent(self, issuer: str, limit: int = -1) -> list[int]:
        """The serials of ``issuer`` that ``sweep`` found absent, in key
        order; the first ``limit`` only, when given. Raises JournalError."""
        return [int(serial, 16) for (serial,) in self._read(
            f"SELECT c.serial FROM candidates c WHERE c.issuer = ? AND {_ABSENT} ORDER BY c.serial LIMIT ?", (issuer, limit))]

    def expired(self) -> list[tuple[str, int, dt.datetime]]:
        """(issuer, serial, the latest notAfter of its rows) of the records
        ``sweep`` found held by expired rows only, in key order; a record
        one of whose ledger rows has a notAfter that does not parse (-1: a
        row in error, which the pass forgets) is not among them. Raises
        JournalError."""
        rows = self._read("SELECT c.issuer, c.serial, max(l.not_after) FROM candidates c CROSS JOIN late l "
                          "ON l.issuer = c.issuer AND l.serial = c.serial GROUP BY c.issuer, c.serial "
                          "HAVING sum(l.not_after = -1) = 0 ORDER BY c.issuer, c.serial", ())
        return [(issuer, int(serial, 16), dt.datetime.fromtimestamp(t, UTC)) for issuer, serial, t in rows]

    def _candidates(self, groups: list[list[str]], issuers: Collection[str], now: dt.datetime) -> None:
        """Fill ``candidates``, the scheduled, unexpired records of
        ``issuers`` no unexpired row holds, and ``late``, the notAfter of
        each of their expired rows (-1 for a ledger row's that does not
        parse): the held keys and each group of ledger paths (each
        attached while it is probed) rule records out."""
        self._db.executescript("""
            CREATE TABLE held_keys (issuer TEXT NOT NULL, serial TEXT NOT NULL, PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
            INSERT OR IGNORE INTO held_keys SELECT issuer, serial FROM held ORDER BY issuer, serial;
            CREATE TABLE candidates (issuer TEXT NOT NULL, serial TEXT NOT NULL, PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
            CREATE TABLE late (issuer TEXT NOT NULL, serial TEXT NOT NULL, not_after INTEGER NOT NULL,
                               PRIMARY KEY (issuer, serial, not_after)) WITHOUT ROWID;""")
        params = {"now": int(now.timestamp()), "now_text": f"{now:%Y-%m-%dT%H:%M:%SZ}",
                  **{f"issuer{n}": name for n, name in enumerate(sorted(issuers))}}
        wanted = ",".join(f":issuer{n}" for n in range(len(issuers)))
        for n, group in enumerate(groups):
            names = [f"ledger{m}" for m in range(len(group))]
            for path, name in zip(group, names):
                self._db.execute(f"ATTACH DATABASE ? AS {name}", (path,))
            held = [f"EXISTS (SELECT 1 FROM {name}.entries e WHERE e.issuer = p.issuer AND e.serial = p.serial "
                    "AND e.not_after > :now_text)" for name in names]
            if n == 0:  # the first group probed in the pass over the schedule: candidates are few
                self._db.execute(f"INSERT INTO candidates SELECT p.issuer, p.serial FROM journal.published p "
                                 f"WHERE p.refresh_at IS NOT NULL AND p.not_after > :now AND p.issuer IN ({wanted}) "
                                 f"AND NOT EXISTS (SELECT 1 FROM held_keys k WHERE k.issuer = p.issuer "
                                 f"AND k.serial = p.serial){''.join(f' AND NOT {h}' for h in held)}", params)
            else:
                self._db.execute(f"DELETE FROM candidates AS p WHERE {' OR '.join(held)}", params)
            for name in names:  # their rows in these ledgers are expired (or do not parse): candidates first
                self._db.execute(f"INSERT OR IGNORE INTO late SELECT c.issuer, c.serial, coalesce(CAST(strftime('%s', "
                                 f"e.not_after) AS INTEGER), -1) FROM candidates c CROSS JOIN {name}.entries e "
                                 "ON e.issuer = c.issuer AND e.serial = c.serial")
            for name in names:
                self._db.execute(f"DETACH DATABASE {name}")
        if self._db.execute("SELECT 1 FROM candidates LIMIT 1").fetchone() is not None:
            # their expired keys of the other sources: scanned once (CROSS JOIN keeps that loop order)
            self._db.execute("INSERT OR IGNORE INTO late SELECT x.issuer, x.serial, x.not_after FROM expired x "
                             "CROSS JOIN candidates c ON c.issuer = x.issuer AND c.serial = x.serial")


class Journal:
    """Open (creating) the journal in ``state_dir``, with a page cache of
    ``cache_kib`` KiB; use as a context manager."""

    def __init__(self, state_dir: str | Path, cache_kib: int = CACHE_KIB) -> None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(state_dir) / "journal.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_SECONDS)
        self._clock_passed: int | None = None  # the second of the last check_clock that passed
        try:
            self._setup(cache_kib)
        except BaseException:
            self._db.close()
            raise

    @_named("open")
    def _setup(self, cache_kib: int) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA cache_size=-{cache_kib}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(published)")}
        for name, sql_type in ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE published ADD COLUMN {name} {sql_type}")
        self._db.execute("CREATE INDEX IF NOT EXISTS published_refresh_at ON published(refresh_at) WHERE refresh_at IS NOT NULL")
        self._db.execute("CREATE INDEX IF NOT EXISTS published_active ON published(issuer, this_update) WHERE refresh_at IS NOT NULL")
        # ``unscheduled``: rows without refresh_at (legacy, or retired after expiry) only, not the whole table
        self._db.execute("CREATE INDEX IF NOT EXISTS published_unscheduled ON published(issuer, serial) WHERE refresh_at IS NULL")

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @_named("read")
    def get(self, issuer: str, serial: int) -> Record | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM published WHERE issuer=? AND serial=?", (issuer, serial_hex(serial))).fetchone()
        return None if row is None else _record(row)

    @_named("read")
    def get_many(self, issuer: str, serials: list[int]) -> dict[int, Record]:
        """The records of up to 500 ``serials`` of ``issuer`` (serial → Record;
        absent when never published): one indexed query instead of one per
        serial, for a planner reading the whole ledger."""
        marks = ",".join("?" * len(serials))
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM published WHERE issuer=? AND serial IN ({marks})",
                                (issuer, *map(serial_hex, serials)))
        return {(r := _record(row)).serial: r for row in rows}

    @_named("write")
    def due_by(self, now: dt.datetime, limit: int, lease: dt.timedelta = ROUTINE_LEASE) -> list[Record]:
        """Up to ``limit`` records whose refresh_at ≤ ``now``, earliest
        first (an index range scan: cost grows with what is due, not with
        the journal's size), each taken for ``lease``: in the same
        transaction its refresh_at moves to ``now`` + ``lease``. A record
        re-signed meanwhile gets its next refresh_at from ``record``; one
        whose re-signing failed, or that the caller skipped (a pending
        ledger change), comes due again after the lease, behind every
        record due before then. Without it, ``limit`` records that fail at
        every tick (an issuer whose signer certificate expired, a serial
        the store cannot write) would stay at the head and no other
        record would ever be re-signed (BR 4.9.9: they would all go past
        nextUpdate)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM published WHERE refresh_at <= ? ORDER BY refresh_at LIMIT ?",
                                    (_ts(now), limit)).fetchall()
            self._db.executemany("UPDATE published SET refresh_at=? WHERE issuer=? AND serial=?",
                                 [(_ts(now + lease), r[0], r[1]) for r in rows])
        return [_record(r) for r in rows]

    def due_all(self, now: dt.datetime) -> Iterator[Record]:
        """Every record whose refresh_at ≤ ``now``, earliest first, streamed
        (``due_by`` without a limit; do not write to the journal meanwhile)."""
        rows = self._rows(f"SELECT {_COLUMNS} FROM published WHERE refresh_at <= ? ORDER BY refresh_at", (_ts(now),))
        for row in rows:
            yield _record(row)

    def _rows(self, sql: str, params: tuple) -> Iterator[tuple]:
        """The rows of a query, streamed; errors as JournalError (``_named``)."""
        cursor = self._query(sql, params)
        while batch := self._fetch(cursor):
            yield from batch

    @_named("read")
    def _query(self, sql: str, params: tuple) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    @_named("read")
    def _fetch(self, cursor: sqlite3.Cursor) -> list[tuple]:
        return cursor.fetchmany(1024)

    @_named("write")
    def retire(self, keys: list[tuple[str, int]]) -> None:
        """Stop scheduling (issuer, serial) pairs (their certificate expired)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE published SET refresh_at=NULL WHERE issuer=? AND serial=?",
                                 [(i, serial_hex(s)) for i, s in keys])

    @_named("write")
    def forget(self, keys: list[tuple[str, int]]) -> None:
        """Stop scheduling (issuer, serial) pairs whose ledger row is gone
        (``model.RowRemoved``), and forget their notAfter: routine
        re-signing reads the journal, not the ledger, and must not re-sign
        a serial the ledger no longer holds. A row put back is judged and
        scheduled again (``Planner.complete_records``)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE published SET refresh_at=NULL, not_after=NULL WHERE issuer=? AND serial=?",
                                 [(i, serial_hex(s)) for i, s in keys])

    @_named("write")
    def retire_expired(self, rows: list[tuple[str, int, dt.datetime]]) -> None:
        """Stop scheduling (issuer, serial, notAfter) records whose ledger
        entry expired, and take the ledger's notAfter: a notAfter moved
        into the past, which the journal's later one would have had
        routine re-sign up to, and ``unscheduled`` list as waiting for a
        schedule (``Planner.complete_records``, ``forget_absent``)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE published SET refresh_at=NULL, not_after=? WHERE issuer=? AND serial=?",
                                 [(_ts(t), i, serial_hex(s)) for i, s, t in rows])

    @_named("write")
    def forget_absent(self, ledgers: list[str], keys: LedgerKeys, issuers: Collection[str], now: dt.datetime,
                      limit: Callable[[int], int]) -> Swept:
        """The sweep after a complete full pass: of the scheduled records of
        ``issuers`` whose notAfter is after ``now``, ``forget`` those that
        no source holds a row for; retire those whose rows all expired at
        ``now`` (a notAfter moved into the past) with the latest ledger
        notAfter (``retire_expired``).

        A source holds a key when one of the SQLite ``ledgers`` (paths of
        existing files: every ``sqlite`` source) has an ``entries`` row
        for it, or the pass put it in ``keys`` (every other source); a row
        in error that names the serial counts as held (the pass reports
        it and forgets it itself). Absent: a row deleted while no reader
        followed the change log, an index line removed, a certificate file
        removed or unreadable.

        The guard: an issuer with more absent records than ``limit(M)``
        (M: its scheduled records whose notAfter is after ``now``; ``limit``
        is non-decreasing, so M is counted only when more than ``limit(0)``
        are absent) forgets none of them (``Swept.withheld``): a ledger
        source read as complete but (nearly) empty must not take every
        serial off the schedule, which would let every response served
        expire at its nextUpdate (BR 4.9.10). Cost and memory:
        ``LedgerKeys.sweep``, plus the keys forgotten and a count of the
        issuer's records per issuer over ``limit(0)``. Raises JournalError."""
        absent = keys.sweep(self.path, ledgers, issuers, now)
        forgotten: list[tuple[str, int]] = []
        withheld: list[Withheld] = []
        for issuer, count in sorted(absent.items()):
            if count > limit(0) and count > (most := limit(scheduled := self.scheduled_count(issuer, now))):
                withheld.append(Withheld(issuer, count, scheduled, most, keys.absent(issuer, WITHHELD_EXAMPLES)))
            else:
                forgotten += [(issuer, serial) for serial in keys.absent(issuer)]
        if forgotten:
            self.forget(forgotten)
        if expired := keys.expired():
            self.retire_expired(expired)
        return Swept(forgotten, withheld)

    @_named("read")
    def scheduled_count(self, issuer: str, now: dt.datetime) -> int:
        """How many records of ``issuer`` are scheduled with a notAfter after
        ``now`` (a range scan of the issuer's records: for the sweep guard
        only, ``forget_absent`` and ``pipeline.forgetting_unknown``)."""
        (count,), = self._db.execute("SELECT count(*) FROM published WHERE issuer = ? AND refresh_at IS NOT NULL "
                                     "AND not_after > ?", (issuer, _ts(now)))
        return count

    @_named("read")
    def unscheduled(self, after: tuple[str, int], limit: int, issuers: Collection[str] | None = None) -> list[Record]:
        """Up to ``limit`` records after (issuer, serial) ``after`` that
        have no refresh_at and an unexpired notAfter (a journal from before
        refresh_at existed, or refresh_after changed), in key order; only
        those of ``issuers`` when given (routine retires the records of an
        issuer no longer configured: they are not waiting for a schedule)."""
        only = "" if issuers is None else f" AND issuer IN ({','.join('?' * len(issuers))})"
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM published WHERE (issuer, serial) > (?, ?) AND refresh_at IS NULL "
                                f"AND not_after > ?{only} ORDER BY issuer, serial LIMIT ?",
                                (after[0], serial_hex(after[1]), _ts(utc_now()), *(issuers or ()), limit))
        return [_record(r) for r in rows]

    @_named("write")
    def unschedule_all(self) -> None:
        """Clear every refresh_at (refresh_after changed: ``unscheduled`` then lists them all)."""
        self._db.execute("UPDATE published SET refresh_at=NULL WHERE refresh_at IS NOT NULL")

    @_named("write")
    def complete(self, entries: list[tuple[LedgerEntry, dt.datetime | None]]) -> None:
        """Fill kind, not_after and refresh_at of records journaled before
        those columns existed, from their ledger entries."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE published SET kind=?, not_after=?, refresh_at=? WHERE issuer=? AND serial=?",
                                 [(e.kind.value, _ts(e.not_after), _ts(at), e.issuer, serial_hex(e.serial)) for e, at in entries])

    @_named("write")
    def schedule(self, times: list[tuple[str, int, dt.datetime]]) -> None:
        """Set refresh_at of (issuer, serial, time) triples."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE published SET refresh_at=? WHERE issuer=? AND serial=?",
                                 [(_ts(t), i, serial_hex(s)) for i, s, t in times])

    @_named("read")
    def setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    @_named("write")
    def set_setting(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


    @_named("read")
    def oldest(self, issuer: str) -> dt.datetime | None:
        """The oldest thisUpdate among ``issuer``'s scheduled records (staleness; an index lookup)."""
        row = self._db.execute("SELECT min(this_update) FROM published WHERE issuer=? AND refresh_at IS NOT NULL",
                               (issuer,)).fetchone()
        return _dt(row[0])

    @_named("read")
    def earliest_next_update(self, issuer: str) -> dt.datetime | None:
        """The earliest nextUpdate among ``issuer``'s scheduled records: when
        the first response still served and re-signed expires. No index
        serves it (one on next_update would be rewritten at every journal
        write): it reads the issuer's rows in primary-key order, a range
        scan, so callers keep it rare (refresh: ``EARLIEST_EVERY``)."""
        row = self._db.execute("SELECT min(next_update) FROM published WHERE issuer=? AND refresh_at IS NOT NULL",
                               (issuer,)).fetchone()
        return _dt(row[0])

    @_named("write")
    def check_clock(self, now: dt.datetime) -> None:
        """Record ``now`` (whole seconds) as the latest time seen; raise
        ClockError when it is more than CLOCK_SLACK before the latest time
        a previous call recorded (the clock jumped backwards). A second
        call within the same second as the last one that passed is free."""
        stamp = int(now.timestamp())
        if stamp == self._clock_passed:
            return
        seen = self.setting("clock")
        latest = _dt(int(seen)) if seen else now
        if now < latest - CLOCK_SLACK:
            raise ClockError(f"the clock reads {now.isoformat()}, earlier than {latest.isoformat()} "
                             f"recorded in {self.path}: it jumped backwards; fix it before signing ({CLOCK_REMEDY})")
        if seen is None or stamp > int(seen):
            self.set_setting("clock", str(stamp))
        self._clock_passed = stamp

    @_named("read")
    def latest_clock(self) -> dt.datetime | None:
        """The latest wall-clock time recorded (``check_clock``), if any."""
        seen = self.setting("clock")
        return _dt(int(seen)) if seen else None

    @_named("write")
    def accept_clock(self, now: dt.datetime, reason: str) -> dt.datetime | None:
        """Accept ``now`` as the clock although it is earlier than the latest
        time recorded (the clock ran fast and was corrected; the operator
        confirmed it, `reissue --clock-was-fast`): the recorded time becomes
        ``now``, and the reset is logged in ``clock_resets`` with ``reason``,
        in one transaction. Returns the time it replaced, or None when the
        clock was not behind it (nothing changed)."""
        stamp = int(now.timestamp())
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seen = self.setting("clock")
            if seen is None or int(seen) <= stamp:
                return None
            self._db.execute("INSERT INTO clock_resets VALUES (?,?,?)", (stamp, int(seen), reason))
            self.set_setting("clock", str(stamp))
        self._clock_passed = None
        return _dt(int(seen))

    @_named("read")
    def clock_resets(self) -> list[tuple[dt.datetime, dt.datetime, str]]:
        """(when, the time it replaced, reason) of every accepted clock, oldest first."""
        return [(_dt(at), _dt(recorded), reason) for at, recorded, reason in
                self._db.execute("SELECT at, recorded, reason FROM clock_resets ORDER BY rowid")]

    @_named("read")
    def future_dated(self, now: dt.datetime) -> list[Record]:
        """The records whose producedAt or thisUpdate is later than ``now``
        (beyond CLOCK_SLACK): signed while the clock ran fast. A full scan:
        for the one-off recovery only."""
        after = _ts(now + CLOCK_SLACK)
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM published WHERE produced_at > ? OR this_update > ?",
                                (after, after))
        return [_record(r) for r in rows]

    @_named("read")
    def unfinished_job(self, selector: str) -> Job | None:
        """The oldest unfinished job with this selector, if any."""
        row = self._db.execute("SELECT id, reason, started FROM jobs WHERE selector=? AND finished IS NULL ORDER BY id LIMIT 1",
                               (selector,)).fetchone()
        return None if row is None else Job(row[0], row[1], selector, _dt(row[2]), True)

    @_named("write")
    def job(self, reason: str, selector: str, now: dt.datetime) -> Job:
        """The unfinished job with this selector (resumed), else a new one."""
        if (job := self.unfinished_job(selector)) is not None:
            return job
        cur = self._db.execute("INSERT INTO jobs (reason, selector, started) VALUES (?,?,?)", (reason, selector, _ts(now)))
        return Job(cur.lastrowid, reason, selector, now, False)

    @_named("write")
    def finish_job(self, job: Job, published: int, now: dt.datetime) -> None:
        self._db.execute("UPDATE jobs SET finished=?, published=published+? WHERE id=?", (_ts(now), published, job.id))

    @_named("write")
    def add_run(self, started: dt.datetime, seconds: float, published: int) -> None:
        self._db.execute("INSERT INTO runs VALUES (?,?,?)", (_ts(started), seconds, published))

    @_named("read")
    def measured_rate(self, min_published: int = 1) -> float | None:
        """Median responses/s of the last 10 runs that published at least
        ``min_published``; None before there is one."""
        rates = sorted(p / s for s, p in self._db.execute(
            "SELECT seconds, published FROM runs WHERE published >= ? AND seconds > 0 ORDER BY started DESC LIMIT 10",
            (min_published,)))
        return rates[len(rates) // 2] if rates else None

    @_named("write")
    def record(self, records: list[Record], purge: list[tuple[str, int]] = (), targets: list[str] = ()) -> None:
        """Upsert ``records`` and queue a purge of each (issuer, serial) in
        ``purge`` for every target name in ``targets``, in one durable
        transaction."""
        rows = [
            (r.issuer, serial_hex(r.serial), _ts(r.this_update), _ts(r.next_update), r.status, _ts(r.revoked_at), r.reason,
             r.signer, r.sha256, r.why, r.kind, _ts(r.not_after), _ts(r.refresh_at), _ts(r.produced_at))
            for r in records
        ]
        now = _ts(utc_now())
        queued = [(t, issuer, serial_hex(serial), now) for t in targets for issuer, serial in purge]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT OR REPLACE INTO published ({_COLUMNS}) VALUES ({','.join('?' * 14)})", rows)
            self._db.executemany("INSERT OR REPLACE INTO purges (target, issuer, serial, queued) VALUES (?,?,?,?)", queued)

    @_named("read")
    def queued_purges(self, target: str, limit: int | None = None) -> list[tuple[str, int]]:
        """(issuer, serial) pairs waiting for ``target``, oldest first."""
        rows = self._db.execute("SELECT issuer, serial FROM purges WHERE target=? ORDER BY queued, issuer, serial LIMIT ?",
                                (target, -1 if limit is None else limit))
        return [(issuer, int(serial, 16)) for issuer, serial in rows]

    @_named("read")
    def queued_by_target(self) -> dict[str, int]:
        """Purges waiting, per target name (configured or not any more)."""
        return dict(self._db.execute("SELECT target, count(*) FROM purges GROUP BY target"))

    @_named("write")
    def purged(self, target: str, done: list[tuple[str, int]]) -> None:
        """Remove acknowledged purges from the queue."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM purges WHERE target=? AND issuer=? AND serial=?",
                                 [(target, i, serial_hex(s)) for i, s in done])

    @_named("write")
    def purge_failed(self, target: str, pending: list[tuple[str, int]], error: str) -> None:
        """Count a failed attempt; the purges stay queued for the next run."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE purges SET attempts=attempts+1, last_error=? WHERE target=? AND issuer=? AND serial=?",
                                 [(error, target, i, serial_hex(s)) for i, s in pending])
