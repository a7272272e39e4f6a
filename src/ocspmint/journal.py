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
sha256 BLOB (of the published DER); primary key (issuer, serial).

Schema ``purges`` (the durable purge queue, docs/purge.md): target TEXT
(a purge target's name), issuer TEXT, serial TEXT, queued INTEGER (Unix
seconds), attempts INTEGER, last_error TEXT; primary key (target, issuer,
serial). Rows are queued in the same transaction as the ``published`` rows
whose served status changed, and deleted when the target acknowledged the
purge, so a purge is never lost between publication and the cache.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import msgspec

from ocspmint.model import UTC, LedgerEntry, serial_hex, utc_now

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
"""


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

    def matches(self, entry: LedgerEntry) -> bool:
        """True when this record states the entry's current status."""
        reason = None if entry.reason is None else int(entry.reason)
        return self.status == entry.status.value and self.revoked_at == entry.revoked_at and self.reason == reason


def _ts(t: dt.datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def _dt(v: int | None) -> dt.datetime | None:
    return None if v is None else dt.datetime.fromtimestamp(v, UTC)


class Journal:
    """Open (creating) the journal in ``state_dir``; use as a context manager."""

    def __init__(self, state_dir: str | Path) -> None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(state_dir) / "journal.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def get(self, issuer: str, serial: int) -> Record | None:
        row = self._db.execute(
            "SELECT this_update, next_update, status, revoked_at, reason, signer, sha256 FROM published WHERE issuer=? AND serial=?",
            (issuer, serial_hex(serial)),
        ).fetchone()
        if row is None:
            return None
        return Record(issuer, serial, _dt(row[0]), _dt(row[1]), row[2], _dt(row[3]), row[4], row[5], row[6])

    def record(self, records: list[Record], purge: list[tuple[str, int]] = (), targets: list[str] = ()) -> None:
        """Upsert ``records`` and queue a purge of each (issuer, serial) in
        ``purge`` for every target name in ``targets``, in one durable
        transaction."""
        rows = [
            (r.issuer, serial_hex(r.serial), _ts(r.this_update), _ts(r.next_update), r.status, _ts(r.revoked_at), r.reason, r.signer, r.sha256)
            for r in records
        ]
        now = _ts(utc_now())
        queued = [(t, issuer, serial_hex(serial), now) for t in targets for issuer, serial in purge]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO published VALUES (?,?,?,?,?,?,?,?,?)", rows)
            self._db.executemany("INSERT OR REPLACE INTO purges (target, issuer, serial, queued) VALUES (?,?,?,?)", queued)

    def queued_purges(self, target: str, limit: int | None = None) -> list[tuple[str, int]]:
        """(issuer, serial) pairs waiting for ``target``, oldest first."""
        rows = self._db.execute("SELECT issuer, serial FROM purges WHERE target=? ORDER BY queued, issuer, serial LIMIT ?",
                                (target, -1 if limit is None else limit))
        return [(issuer, int(serial, 16)) for issuer, serial in rows]

    def purged(self, target: str, done: list[tuple[str, int]]) -> None:
        """Remove acknowledged purges from the queue."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM purges WHERE target=? AND issuer=? AND serial=?",
                                 [(target, i, serial_hex(s)) for i, s in done])

    def purge_failed(self, target: str, pending: list[tuple[str, int]], error: str) -> None:
        """Count a failed attempt; the purges stay queued for the next run."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE purges SET attempts=attempts+1, last_error=? WHERE target=? AND issuer=? AND serial=?",
                                 [(error, target, i, serial_hex(s)) for i, s in pending])
