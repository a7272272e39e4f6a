"""`ocspmint run --incremental`: plan only what changed since the last full pass.

A full pass reads the whole ledger and the journal; at hundreds of millions
of serials that is the cost of a run even when nothing is due. With one
``sqlite`` ledger source, whose ``changes`` log is a durable cursor
(``ledger.sqlite.SqliteTail``), a run can instead plan:

- the entries changed in the ledger since the mark left by the last run
  that published everything it planned (new precertificates, revocations);
- the journal records whose ``refresh_at`` came (``Journal.due_all``, an
  index range: routine BR 4.9.9 re-signing, spread like `ocspmint refresh`
  does it); records of expired certificates are retired.

Its cost grows with what is due, not with the ledger. The mark (change-log
position, source path, signer key hashes, refresh_after) is kept in the
journal's ``meta`` table, with what proves the change log still continues
from it (``ledger.sqlite.Cursor``). A full pass is made instead, and says
why, when the ledger cannot be read incrementally (schema version 1, change
log triggers missing), there is no mark yet, the sources or signers or
refresh_after changed, the change log does not continue from the mark
(ledger replaced or restored from a backup, unread change rows deleted, the
log re-created), journal records of a configured issuer have no
``refresh_at`` and an unexpired notAfter (a journal from before it existed;
the records of an issuer no longer configured, which routine retires, do
not count: they would make every run a full pass), or the change log holds
more than MAX_CHANGES rows past the mark (a bulk load). A full pass that
cannot follow the change log voids the mark: changes made while the log was
incomplete are in no log.

Memory: the run keeps the key of every changed entry it plans, for routine
re-signing to skip (the journal still holds its older status), ~200 bytes
each; so it reads at most MAX_CHANGES change rows, counted before reading
(the newest change id minus the mark's). Past that, a full pass, whose
memory does not grow with the ledger, and which costs less than that many
lookups by key once the changes are a good part of the ledger.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

from ocspmint.config import Config
from ocspmint.issuer import IssuerIdentity
from ocspmint.journal import Journal
from ocspmint.ledger.sqlite import ChangeLogError, Cursor, SqliteTail
from ocspmint.model import LedgerEntry, LedgerError
from ocspmint.planner import routine

MARK = "incremental_mark"
MAX_CHANGES = 1_000_000  # change rows an incremental run reads at most (module docstring: memory)
_CURSOR = ("position", "change", "log")  # the mark's keys that are the cursor, not the identity


class LedgerMark:
    """The change-log cursor of a run's single sqlite source (or none)."""

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], journal: Journal) -> None:
        self.journal, self.state_dir = journal, config.state_dir
        self.issuers = sorted(issuers)  # the configured issuers' names: only their records wait for a schedule
        sources = config.sources
        self.tail = SqliteTail(sources[0], issuers) if len(sources) == 1 and sources[0].type == "sqlite" else None
        self.identity = {"source": sources[0].path if sources else "",
                         "signers": {n: i.signer.key_hash.hex() for n, i in sorted(issuers.items())},
                         "refresh_after": config.response.refresh_after.total_seconds()}

    def why_full(self) -> str | None:
        """Why an incremental run must make a full pass instead (see the
        module docstring); None when it need not."""
        if self.tail is None:
            return "--incremental needs exactly one ledger source of type sqlite"
        raw = self.journal.setting(MARK)
        mark = {} if raw is None else json.loads(raw)
        try:
            self.tail.start(self._cursor(mark) if raw is not None and mark.get("position") is not None else None)
        except LedgerError as e:
            return f"the ledger's change log cannot be followed: {e}"
        if raw is None:
            return "no run has published everything it planned from this ledger yet"
        if mark.get("position") is None:
            return f"the last full pass could not follow the ledger's change log ({mark.get('void', '')})"
        if {k: v for k, v in mark.items() if k not in _CURSOR} != self.identity:
            return "the ledger source, a signer key or refresh_after changed since the last full pass"
        if self.journal.unscheduled(("", 0), 1, self.issuers):
            return "journal records without refresh_at (journal written before it existed)"
        if (unread := self.tail.unread) > MAX_CHANGES:
            return (f"{unread:,} ledger changes since the last complete run, more than the {MAX_CHANGES:,} an "
                    "incremental run reads (it keeps every changed serial in memory; a full pass does not)")
        return None

    @staticmethod
    def _cursor(mark: dict[str, object]) -> Cursor:
        """The mark's cursor (a mark saved before ``change``/``log`` existed: its id only)."""
        position, change, log = mark["position"], mark.get("change"), mark.get("log")
        assert isinstance(position, int) and isinstance(change, str | None) and isinstance(log, str | None)
        return Cursor(position, change, log)

    def start(self) -> None:
        """Remember the ledger's newest change (before a full pass reads
        it). A ledger the cursor cannot read (schema version 1, missing)
        leaves no mark (the full pass reports the ledger's own errors); one
        whose change log is incomplete (triggers dropped) also voids the
        saved mark: what is written until the log is whole again is in no log."""
        if self.tail is not None:
            try:
                self.tail.start()
            except LedgerError as e:
                self.tail = None
                if isinstance(e, ChangeLogError):  # a connection of its own: a full pass calls this on its thread
                    with Journal(self.state_dir) as journal:
                        if journal.setting(MARK) is not None:
                            journal.set_setting(MARK, json.dumps({**self.identity, "position": None, "void": e.message}))

    def changes(self) -> Iterator[LedgerEntry | LedgerError]:
        """Ledger entries (and error rows) changed since the mark, from at
        most MAX_CHANGES change rows (more written since ``why_full`` counted
        them are left to the next run); raises LedgerError when the change
        log does not continue from the mark."""
        assert self.tail is not None
        cursor = self._cursor(json.loads(self.journal.setting(MARK) or "{}"))
        self.tail.start(cursor)
        for change in self.tail.changes(upto=cursor.position + MAX_CHANGES):
            yield change.item

    def routine(self, issuers: dict[str, IssuerIdentity], now: dt.datetime,
                skip: set[tuple[str, int]]) -> Iterator[LedgerEntry]:
        """As entries, the journal records due for routine re-signing at
        ``now`` (``source`` "journal"), but for the keys in ``skip``
        (planned from the ledger already); expired ones are retired."""
        expired: list[tuple[str, int]] = []
        for entry in routine(self.journal.due_all(now), issuers, now, expired):
            if (entry.issuer, entry.serial) not in skip:
                yield entry
        if expired:
            self.journal.retire(expired)

    def save(self) -> None:
        """Record the position reached (after a run that published everything due)."""
        if self.tail is not None:
            self.journal.set_setting(MARK, json.dumps({**self.identity, **self.tail.cursor._asdict()}))
