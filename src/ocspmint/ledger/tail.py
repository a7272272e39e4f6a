"""Incremental ledger reading: what changed in one source since the last look.

A long-running service keeps one Tail per configured Source::

    tail = Tail(source, issuers)
    tail.start()                                  # remember the position, yield nothing
    for item in read_source(source, issuers): ... # one full pass
    while running:
        for change in tail.changes(): ...         # change.item, change.seen_at
        sleep(poll)

``changes()`` yields a ``Change(item, seen_at)`` for every entry added or
changed since the previous ``start()``/``changes()`` call: ``item`` is the
entry's current state as ``read_source`` would give it, or a LedgerError
naming ``path:line`` / ``<db>:<issuer>/<serial>`` / a file, like
``read_source``'s error rows. ``seen_at`` (aware UTC, whole seconds) is when
the ledger recorded the change, for measuring ledger → served latency: the
``changes.at`` of the row's first change in this call (sqlite), or the mtime
of the file that changed (index.txt; a certificate file or CRL for certdir).

Delivery is at least once: a change made between ``start()`` and the full
pass comes again from the first ``changes()``; the position advances only
when a ``changes()`` iterator is exhausted, so one abandoned early (or
interrupted by an exception) is yielded again by the next call. An entry
may thus come with nothing changed in it; consumers compare.

``changes()`` raises LedgerError (on first ``next()``) when the source as a
whole is unusable (file gone, unreadable database); the position is kept and
the next call tries again. For ``sqlite`` that includes a change log that no
longer continues from the position (ledger replaced or restored from a
backup, unread change rows deleted, triggers dropped): nothing is read from
it until a new ``start()`` (then a full pass), rather than changes missed.

Cost per call (details in each reader's Tail class and docs/ledger.md):

- ``sqlite`` (``ledger.sqlite.SqliteTail``): one indexed range query on the
  ``changes`` log from the last id seen, grouped by key in SQLite's
  temporary storage, one primary-key lookup per changed key. Needs schema
  version 2 (a version-1 file is migrated when opened for writing).
  Memory: nothing per change.
- ``openssl-index`` (``ledger.openssl_index.IndexTail``): one ``stat``
  when unchanged; else a read of the file, a hash per line, and parsing of
  changed and appended lines only. Memory: 8 bytes per line plus a
  serial → line map for duplicate detection.
- ``certdir`` (``ledger.certdir.CertdirTail``): one ``stat`` per folder
  and CRL when unchanged; else a listing of the folder tree (no per-file
  ``stat``) and reading only new files (every file when one was removed or
  replaced), and a re-read of all CRLs when one changed. ``start()`` reads
  every certificate once to know which files hold each serial
  (precertificate/certificate pairing, conflicts).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import NamedTuple, Protocol

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity
from ocspmint.model import UTC, LedgerEntry, LedgerError


class Change(NamedTuple):
    """One changed entry (or error row) and when the ledger recorded it."""

    item: LedgerEntry | LedgerError
    seen_at: dt.datetime  # aware UTC, whole seconds


def file_time(mtime_ns: int) -> dt.datetime:
    """A file's ``st_mtime_ns`` → aware UTC datetime, whole seconds (floored)."""
    return dt.datetime.fromtimestamp(mtime_ns // 10**9, UTC)


class _Reader(Protocol):
    def start(self) -> None: ...

    def changes(self) -> Iterator[Change]: ...


class Tail:
    """Incremental reader for one configured Source (see module docstring)."""

    def __init__(self, source: Source, issuers: Mapping[str, IssuerIdentity]) -> None:
        """No I/O. Raises ValueError for an unknown ``source.type``."""
        self.source = source
        self._reader: _Reader
        if source.type == "openssl-index":
            from ocspmint.ledger.openssl_index import IndexTail

            self._reader = IndexTail(source, issuers)
        elif source.type == "certdir":
            from ocspmint.ledger.certdir import CertdirTail

            self._reader = CertdirTail(source, issuers)
        elif source.type == "sqlite":
            from ocspmint.ledger.sqlite import SqliteTail

            self._reader = SqliteTail(source, issuers)
        else:
            raise ValueError(f"unknown ledger source type {source.type!r}")
        self._started = False

    def start(self) -> None:
        """Remember the source's current position; yields nothing. Call it
        right before the full ``read_source`` pass (and again to restart).
        Raises LedgerError when the source is unusable (as read_source)."""
        self._reader.start()
        self._started = True

    def changes(self) -> Iterator[Change]:
        """Changes since the previous ``start()``/exhausted ``changes()``.
        Raises RuntimeError before ``start()``."""
        if not self._started:
            raise RuntimeError("Tail.changes() called before Tail.start()")
        return self._reader.changes()
