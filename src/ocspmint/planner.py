"""Planner: which ledger entries are due for a (new) response now.

An entry is due when it has never been published (``new``), when the
ledger's status, revocation time or reason differs from what was published
(``changed``), when the signing key differs (``signer``), or when ``now``
is past the refresh point thisUpdate + refresh_after (``refresh``,
BR 4.9.9). Entries whose notAfter has passed are not re-signed.

A ``Force`` (`ocspmint reissue`, `audit --fix`) makes every entry due
(``forced``) unless the journal shows it signed by that force (same
``why``, producedAt at or after its start), so an interrupted reissue
resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator

import msgspec

from ocspmint.journal import Journal, Record
from ocspmint.model import LedgerEntry


REFRESH_MARGIN = dt.timedelta(hours=8)  # BR 4.9.9: re-signed at least 8 h before nextUpdate


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
    refresh_after, or 8 h before nextUpdate when that comes first (a
    nextUpdate cut back to the signer certificate's notAfter; BR 4.9.9)."""
    return min(this_update + refresh_after, next_update - REFRESH_MARGIN)


def refresh_at(this_update: dt.datetime, next_update: dt.datetime, serial: int, refresh_after: dt.timedelta,
               not_after: dt.datetime) -> dt.datetime | None:
    """When `ocspmint refresh` re-signs a response: between refresh_after/2
    and refresh_after after thisUpdate, at a fraction fixed by a hash of
    the serial, so responses signed together come due spread over half the
    period and the HSM sees a flat load; never past ``refresh_point``.
    None when the certificate expires first (no re-signing after
    notAfter)."""
    digest = hashlib.blake2b(serial.to_bytes(21, "big"), digest_size=4).digest()
    fraction = int.from_bytes(digest, "big") / 2**32
    at = this_update + refresh_after / 2 * (1 + fraction)
    at = min(at.replace(microsecond=0), refresh_point(this_update, next_update, refresh_after))
    return None if at >= not_after else at


class Planner:
    """Streams due entries; ``counts`` tallies every decision."""

    def __init__(self, journal: Journal, signer_ids: dict[str, str], refresh_after: dt.timedelta, now: dt.datetime,
                 force: Force | None = None) -> None:
        self.journal = journal
        self.signer_ids = signer_ids
        self.refresh_after = refresh_after
        self.now = now
        self.counts: Counter[str] = Counter()
        # up-to-date entries whose journal record predates kind/not_after/refresh_at
        self.incomplete: list[tuple[LedgerEntry, Record]] = []
        self.force = force

    def reason(self, entry: LedgerEntry) -> str | None:
        """Why ``entry`` is due ("new", "changed", "signer", "forced",
        "refresh"), "expired", or None."""
        if entry.not_after <= self.now:
            return "expired"
        rec = self.journal.get(entry.issuer, entry.serial)
        if rec is None:
            return "new"
        if not rec.matches(entry):
            return "changed"
        if rec.signer != self.signer_ids[entry.issuer]:
            return "signer"
        if self.force is not None and not self._forced_done(rec):
            return "forced"
        if self.now >= refresh_point(rec.this_update, rec.next_update, self.refresh_after):
            return "refresh"
        if rec.not_after is None:
            self.incomplete.append((entry, rec))
        return None

    def _forced_done(self, rec: Record) -> bool:
        """Signed by this force already: journaled with its ``why`` since it began."""
        assert self.force is not None
        return rec.why == self.force.why and rec.produced_at is not None and rec.produced_at >= self.force.since

    def judge(self, entry: LedgerEntry) -> str | None:
        """``reason(entry)`` counted in ``counts``; None unless it is due now."""
        why = self.reason(entry)
        self.counts[why or "up_to_date"] += 1
        return None if why == "expired" else why

    def due(self, entries: Iterable[LedgerEntry]) -> Iterator[tuple[LedgerEntry, str]]:
        for entry in entries:
            if why := self.judge(entry):
                yield entry, why
