"""Planner: which ledger entries are due for a (new) response now.

An entry is due when it has never been published (``new``), when the
ledger's status, revocation time or reason differs from what was published
(``changed``), when the signing key differs (``signer``), or when ``now``
is past the refresh point thisUpdate + refresh_after (``refresh``,
BR 4.9.9). Entries whose notAfter has passed are not re-signed; their
journal records leave the schedule with the ledger's notAfter (one moved
into the past must not leave routine re-signing the journal's later one):
``judge`` and ``due(expired=True)`` look them up, a full pass leaves that
to its sweep (``pipeline.report_absent``).

A revocation is final (RFC 5280 §5.3.1, BR 4.9.13): a ledger entry that
says good for a serial the journal shows published revoked is judged as
the published revocation (so it is still refreshed) and kept in
``Planner.unrevoked`` for the caller to report as a ledger failure.

A ``Force`` (`ocspmint reissue`, `audit --fix`) makes every entry due
(``forced``) unless the journal shows it signed by that force (same
``why``, producedAt at or after its start), so an interrupted reissue
resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Container, Iterable, Iterator
from typing import IO

import msgspec
from msgspec.structs import replace

from ocspmint.journal import Journal, Record
from ocspmint.model import Kind, LedgerEntry, Reason, Status


REFRESH_MARGIN = dt.timedelta(hours=8)  # BR 4.9.9: re-signed at least 8 h before nextUpdate (interval ≥ 16 h)
SHORT_INTERVAL = dt.timedelta(hours=16)  # BR 4.9.9: below it, re-signed before half the interval
LOOKUP_CHUNK = 500  # serials per journal query while planning a whole ledger
COMPLETE_CHUNK = 10_000  # incomplete records held before ``Planner.due`` writes them (``complete_records``)


class Force(msgspec.Struct, frozen=True):
    """Re-sign selected entries whatever the journal says.

    ``why``: journaled as the reason of each forced response; ``since``:
    an entry re-signed at or after this time (aware UTC) is done;
    ``purge``: queue CDN purges for the forced responses.
    """

    why: str
    since: dt.datetime
    purge: bool = True


def refresh_point(this_update: dt.datetime, next_update: dt.datetime, refresh_after: dt.timedelta) -> dt.datetime:
    """The latest time a response may be re-signed: thisUpdate +
    refresh_after, or BR 4.9.9's latest point when that comes first (a
    nextUpdate cut back to the signer certificate's notAfter): 8 h before
    nextUpdate for an inclusive interval of 16 h or more, else half the
    interval before nextUpdate."""
    interval = next_update - this_update + dt.timedelta(seconds=1)
    latest = next_update - (REFRESH_MARGIN if interval >= SHORT_INTERVAL else interval / 2)
    return min(this_update + refresh_after, latest)


def refresh_at(this_update: dt.datetime, next_update: dt.datetime, serial: int, refresh_after: dt.timedelta,
               not_after: dt.datetime) -> dt.datetime:
    """When `ocspmint refresh` re-signs a response: between refresh_after/2
    and refresh_after after thisUpdate, at a fraction fixed by a hash of
    the serial, so responses signed together come due spread over half the
    period and the HSM sees a flat load; never past ``refresh_point``.
    When the certificate expires first: its notAfter, when the record comes
    due only to be retired (``routine``; nothing is signed after notAfter).
    None (no schedule) is left for journal records not reckoned yet
    (``Journal.unscheduled``). Many serials of one batch: ``RefreshSchedule``."""
    return RefreshSchedule(this_update, next_update, refresh_after).at(serial, not_after)


class RefreshSchedule:
    """``refresh_at`` for the responses of one batch (same thisUpdate,
    nextUpdate and refresh_after), ``refresh_point`` reckoned once."""

    def __init__(self, this_update: dt.datetime, next_update: dt.datetime, refresh_after: dt.timedelta) -> None:
        self._this_update, self._half = this_update, refresh_after / 2
        self._latest = refresh_point(this_update, next_update, refresh_after)

    def at(self, serial: int, not_after: dt.datetime) -> dt.datetime:
        """``refresh_at`` of ``serial`` (``not_after`` when that comes first)."""
        digest = hashlib.blake2b(serial.to_bytes(21, "big"), digest_size=4).digest()
        at = self._this_update + self._half * (1 + int.from_bytes(digest, "big") / 2**32)
        return min(at.replace(microsecond=0), self._latest, not_after)


def entry_of(rec: Record) -> LedgerEntry:
    """The ledger entry a journal record states (routine re-signing needs no ledger read)."""
    return LedgerEntry(rec.issuer, rec.serial, Kind(rec.kind), rec.not_after, Status(rec.status), rec.revoked_at,
                       None if rec.reason is None else Reason(rec.reason), "journal")


def routine(records: Iterable[Record], issuers: Container[str], now: dt.datetime,
            expired: list[tuple[str, int]]) -> Iterator[LedgerEntry]:
    """The entries of journal records whose ``refresh_at`` came (from
    ``Journal.due_by``/``due_all``); the keys of records whose certificate
    expired (or whose issuer is no longer configured) go to ``expired``,
    for ``Journal.retire`` once the records are read."""
    for rec in records:
        if rec.not_after is None or rec.not_after <= now or rec.issuer not in issuers:
            expired.append((rec.issuer, rec.serial))
        else:
            yield entry_of(rec)


class Planner:
    """Streams due entries; ``counts`` tallies every decision."""

    def __init__(self, journal: Journal, signer_ids: dict[str, str], refresh_after: dt.timedelta, now: dt.datetime,
                 force: Force | None = None) -> None:
        self.journal = journal
        self.signer_ids = signer_ids
        self.refresh_after = refresh_after
        self.now = now
        self.counts: Counter[str] = Counter()
        # up-to-date entries whose journal record must be completed (``complete_records``)
        self.incomplete: list[tuple[LedgerEntry, Record]] = []
        self.force = force
        # ledger entries saying good for a serial published revoked: (entry, its record)
        self.unrevoked: list[tuple[LedgerEntry, Record]] = []
        # expired ledger entries whose record is still scheduled or states another notAfter (``complete_records``)
        self.outdated: list[LedgerEntry] = []

    def _decide(self, entry: LedgerEntry, rec: Record | None) -> tuple[LedgerEntry, str | None]:
        """(the entry to sign, why it is due: "new", "changed", "signer",
        "forced", "refresh" or None) for an unexpired ledger entry given its
        journal record; the entry to sign is the published revocation when
        the ledger tries to undo it (``unrevoked``)."""
        if rec is None:
            return entry, "new"
        if rec.status == Status.REVOKED.value and entry.status is Status.GOOD:
            self.unrevoked.append((entry, rec))
            entry = replace(entry, status=Status.REVOKED, revoked_at=rec.revoked_at,
                            reason=None if rec.reason is None else Reason(rec.reason))
        if not rec.matches(entry):
            return entry, "changed"
        if rec.signer != self.signer_ids[entry.issuer]:
            return entry, "signer"
        if self.force is not None and not self._forced_done(rec):
            return entry, "forced"
        latest = refresh_point(rec.this_update, rec.next_update, self.refresh_after)
        if self.now >= latest:
            return entry, "refresh"
        if (rec.not_after != entry.not_after.replace(microsecond=0) or rec.kind != entry.kind.value
                or rec.refresh_at is None or rec.refresh_at > latest):
            self.incomplete.append((entry, rec))
        return entry, None

    def _expired(self, entry: LedgerEntry, rec: Record | None) -> None:
        """Count an expired ledger entry; keep it in ``outdated`` when its
        record is still scheduled or states another notAfter."""
        self.counts["expired"] += 1
        if rec is not None and (rec.refresh_at is not None or rec.not_after != entry.not_after.replace(microsecond=0)):
            self.outdated.append(entry)

    def complete_records(self) -> None:
        """Rewrite kind, not_after and refresh_at of the ``incomplete``
        records from their ledger entries and the current refresh_after,
        and retire the ``outdated`` ones with their entry's notAfter
        (``Journal.retire_expired``).

        A record not due yet is ``incomplete`` when routine re-signing
        (which reads the journal alone) would otherwise get it wrong:
        kind, not_after or refresh_at missing (journaled before those
        columns existed, forgotten after its ledger row was deleted and
        now put back, retired while still valid); notAfter or kind
        differing from the ledger's (routine would retire it at a notAfter
        the ledger no longer states, or re-sign it past the one it now
        states); or a refresh_at later than ``refresh_point`` under the
        current refresh_after (scheduled under a longer one). Without a
        ``Force``, ``due`` completes them ``COMPLETE_CHUNK`` at a time, so
        memory stays flat on a whole-ledger pass (a forced pass, which
        `reissue --dry-run` makes too, writes nothing before this call,
        and forces nearly every entry anyway); call this at the end."""
        if self.incomplete:
            self.journal.complete([(e, refresh_at(r.this_update, r.next_update, e.serial, self.refresh_after, e.not_after))
                                   for e, r in self.incomplete])
            self.incomplete = []
        if self.outdated:
            self.journal.retire_expired([(e.issuer, e.serial, e.not_after) for e in self.outdated])
            self.outdated = []

    def _forced_done(self, rec: Record) -> bool:
        """Signed by this force already: journaled with its ``why`` since it began."""
        assert self.force is not None
        return rec.why == self.force.why and rec.produced_at is not None and rec.produced_at >= self.force.since

    def judge(self, entry: LedgerEntry) -> tuple[LedgerEntry, str] | None:
        """(the entry to sign, why) when ``entry`` is due now, else None;
        judged like ``due(expired=True)``, counted in ``counts``."""
        rec = self.journal.get(entry.issuer, entry.serial)
        if entry.not_after <= self.now:
            self._expired(entry, rec)
            return None
        entry, why = self._decide(entry, rec)
        self.counts[why or "up_to_date"] += 1
        return None if why is None else (entry, why)

    def due(self, entries: Iterable[LedgerEntry], expired: bool = False) -> Iterator[tuple[LedgerEntry, str]]:
        """(entry, why) for every due entry, judged like ``judge``; the
        journal is read ``LOOKUP_CHUNK`` serials of one issuer at a time,
        so entries come out grouped by issuer, not in ledger order.
        ``expired``: also read the records of expired entries, for
        ``outdated`` (a set of changes); a whole-ledger pass leaves it
        False (most rows of an old ledger are expired: a probe each) and
        sweeps instead (``pipeline.report_absent``)."""
        pending: dict[str, list[LedgerEntry]] = {}
        for entry in entries:
            if entry.not_after <= self.now and not expired:
                self.counts["expired"] += 1
                continue
            group = pending.setdefault(entry.issuer, [])
            group.append(entry)
            if len(group) >= LOOKUP_CHUNK:
                yield from self._judge_group(pending.pop(entry.issuer))
        for group in pending.values():
            yield from self._judge_group(group)

    def _judge_group(self, group: list[LedgerEntry]) -> Iterator[tuple[LedgerEntry, str]]:
        records = self.journal.get_many(group[0].issuer, [e.serial for e in group])
        for ledger_entry in group:
            if ledger_entry.not_after <= self.now:
                self._expired(ledger_entry, records.get(ledger_entry.serial))
                continue
            entry, why = self._decide(ledger_entry, records.get(ledger_entry.serial))
            self.counts[why or "up_to_date"] += 1
            if why:
                yield entry, why
        full = max(len(self.incomplete), len(self.outdated)) >= COMPLETE_CHUNK
        if full and self.force is None:  # a forced pass may be a dry run
            self.complete_records()


class Spool:
    """Due (entry, why) pairs, in order, from one planning thread to one
    signing thread while the plan still runs: the first ``memory_entries``
    held in memory (~250 bytes each), the rest in an unlinked temporary
    file of ``folder``, one JSON line each (~200 bytes), so a whole-ledger
    plan takes disk, not memory. The planner ``add``s them, then calls
    ``finish`` (or ``fail`` with the exception that ended the plan);
    ``entries`` reads them as they come. ``len`` counts what was added.
    Close it (or use ``with``) to free the file."""

    MEMORY_ENTRIES = 100_000
    NOTIFY_EVERY = 256  # entries added between wake-ups of a waiting reader (and file flushes)
    READ_BYTES = 1 << 20

    def __init__(self, folder: str, memory_entries: int = MEMORY_ENTRIES) -> None:
        self._folder = folder
        self._memory_entries = memory_entries
        self._held: list[tuple[LedgerEntry, str]] = []
        self._file: IO[bytes] | None = None
        self._encode = msgspec.json.Encoder().encode  # JSON: serials reach 160 bits
        self._count = 0
        self._readable = 0  # entries a reader may take: held ones and lines flushed to the file
        self._flushed = 0  # bytes of the file flushed
        self._ended = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._held = []
        if self._file is not None:
            self._file.close()

    def __len__(self) -> int:
        return self._count

    @property
    def spilled(self) -> bool:
        """True once entries go to the temporary file."""
        return self._file is not None

    @property
    def finished(self) -> bool:
        """True once ``finish`` was called: ``len`` is the plan's total."""
        return self._ended and self._error is None

    def add(self, planned: tuple[LedgerEntry, str]) -> None:
        self._count += 1
        if self._file is None and len(self._held) < self._memory_entries:
            self._held.append(planned)
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._folder)
            self._file.write(self._encode(planned) + b"\n")  # JSON escapes every newline in a string
        if self._count % self.NOTIFY_EVERY == 0:
            self._publish()

    def _publish(self, error: BaseException | None = None, ended: bool = False) -> None:
        if self._file is not None:
            self._file.flush()
        with self._changed:
            self._readable = self._count
            self._flushed = self._file.tell() if self._file is not None else 0
            self._ended, self._error = ended, error
            self._changed.notify_all()

    def finish(self) -> None:
        """The plan is complete: ``entries`` ends after the last one."""
        self._publish(ended=True)

    def fail(self, error: BaseException) -> None:
        """The plan ended with ``error``: ``entries`` raises it."""
        self._publish(error, ended=True)

    def entries(self, wait: float = 0.02) -> Iterator[tuple[LedgerEntry, str] | None]:
        """What was added, in order, as it comes: yields None after
        ``wait`` seconds with nothing new (so the reader can tend to other
        work), ends after the last entry once ``finish`` was called,
        raises the exception given to ``fail``."""
        taken, offset, rest = 0, 0, b""
        decode = msgspec.json.Decoder(tuple[LedgerEntry, str]).decode
        while True:
            with self._changed:
                if self._readable == taken and not self._ended:
                    self._changed.wait(wait)
                readable, flushed, ended, error = self._readable, self._flushed, self._ended, self._error
            if error is not None:
                raise error
            if readable == taken:
                if ended:
                    return
                yield None
                continue
            while taken < min(readable, len(self._held)):
                taken += 1
                yield self._held[taken - 1]
            while taken < readable:  # READ_BYTES at a time: memory stays flat however far behind the reader is
                assert self._file is not None
                data = os.pread(self._file.fileno(), min(flushed - offset, self.READ_BYTES), offset)
                if not data:
                    raise OSError(f"spool file ends at byte {offset}, before its line {taken + 1 - len(self._held)}")
                offset += len(data)
                chunk = rest + data
                *lines, rest = chunk.split(b"\n")
                for line in lines:
                    taken += 1
                    yield decode(line)
