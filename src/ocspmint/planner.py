"""Planner: which ledger entries are due for a (new) response now.

An entry is due when it has never been published (``new``), when the
ledger's status, revocation time or reason differs from what was published
(``changed``), when the signing key differs (``signer``), or when ``now``
is past the refresh point thisUpdate + refresh_after (``refresh``,
BR 4.9.9). Entries whose notAfter has passed are not re-signed.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Iterator

from ocspmint.journal import Journal
from ocspmint.model import LedgerEntry


class Planner:
    """Streams due entries; ``counts`` tallies every decision."""

    def __init__(self, journal: Journal, signer_ids: dict[str, str], refresh_after: dt.timedelta, now: dt.datetime) -> None:
        self.journal = journal
        self.signer_ids = signer_ids
        self.refresh_after = refresh_after
        self.now = now
        self.counts: Counter[str] = Counter()

    def reason(self, entry: LedgerEntry) -> str | None:
        """Why ``entry`` is due ("new", "changed", "signer", "refresh") or None."""
        if entry.not_after <= self.now:
            return "expired"
        rec = self.journal.get(entry.issuer, entry.serial)
        if rec is None:
            return "new"
        if not rec.matches(entry):
            return "changed"
        if rec.signer != self.signer_ids[entry.issuer]:
            return "signer"
        if self.now >= rec.this_update + self.refresh_after:
            return "refresh"
        return None

    def due(self, entries: Iterable[LedgerEntry]) -> Iterator[tuple[LedgerEntry, str]]:
        for entry in entries:
            why = self.reason(entry)
            self.counts[why or "up_to_date"] += 1
            if why is not None and why != "expired":
                yield entry, why
