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
journal's ``meta`` table. A full pass is made instead, and says why, when
there is no mark yet, the sources or signers or refresh_after changed, or
journal records have no ``refresh_at`` (a journal from before it existed).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

from ocspmint.config import Config
from ocspmint.issuer import IssuerIdentity
from ocspmint.journal import Journal
from ocspmint.ledger.sqlite import SqliteTail
from ocspmint.model import LedgerEntry, LedgerError
from ocspmint.planner import routine

MARK = "incremental_mark"


class LedgerMark:
    """The change-log cursor of a run's single sqlite source (or none)."""

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], journal: Journal) -> None:
        self.journal = journal
        sources = config.sources
        self.tail = SqliteTail(sources[0], issuers) if len(sources) == 1 and sources[0].type == "sqlite" else None
        self.identity = {"source": sources[0].path if sources else "",
                         "signers": {n: i.signer.key_hash.hex() for n, i in sorted(issuers.items())},
                         "refresh_after": config.response.refresh_after.total_seconds()}

    def why_full(self) -> str | None:
        """Why an incremental run must make a full pass instead; None when it need not."""
        if self.tail is None:
            return "--incremental needs exactly one ledger source of type sqlite"
        raw = self.journal.setting(MARK)
        if raw is None:
            return "no run has published everything it planned from this ledger yet"
        if {k: v for k, v in json.loads(raw).items() if k != "position"} != self.identity:
            return "the ledger source, a signer key or refresh_after changed since the last full pass"
        if self.journal.unscheduled(("", 0), 1):
            return "journal records without refresh_at (journal written before it existed)"
        return None

    def start(self) -> None:
        """Remember the ledger's newest change (before a full pass reads
        it). A ledger the cursor cannot read (schema version 1) leaves no
        mark; the full pass reports the ledger's own errors."""
        if self.tail is not None:
            try:
                self.tail.start()
            except LedgerError:
                self.tail = None

    def changes(self) -> Iterator[LedgerEntry | LedgerError]:
        """Ledger entries (and error rows) changed since the mark."""
        assert self.tail is not None
        self.tail.start(json.loads(self.journal.setting(MARK) or "{}")["position"])
        for change in self.tail.changes():
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
            self.journal.set_setting(MARK, json.dumps({**self.identity, "position": self.tail.position}))
