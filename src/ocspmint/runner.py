"""Runner: one batch at a time from ResponseData to a journaled response.

``sign_all`` feeds planned entries through a SignerPool; the Runner
encodes each batch (byte template). With ``signing.verify`` the signer
workers assemble and verify every response (``signer.Checked``) and the
Runner stores only those that passed; without it the Runner assembles
them from the signatures. It hands them to the store and journals them
once the store acknowledged them, queueing CDN purges in the same
transaction (docs/ocsp-rules.md, docs/purge.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from ocspmint.config import Config
from ocspmint.encoder import ResponseTemplate, Times
from ocspmint.issuer import IssuerIdentity
from ocspmint.journal import ClockError, Journal, Record
from ocspmint.model import LedgerEntry, serial_hex, utc_now
from ocspmint.planner import Force, RefreshSchedule
from ocspmint.report import Failure, Progress, Summary
from ocspmint.served import Sample
from ocspmint.signer import Checked, Failed, SignBatch, Signed, SignerError, SignerPool, expect
from ocspmint.store import PutItem, Store, object_key
from ocspmint.verifier import signature_valid

MIN_INTERVAL = dt.timedelta(hours=8)
_END = ("", [])  # sign_all: ``due`` is exhausted


Planned = tuple[LedgerEntry, str]  # (entry, why it is due)


def batch_times(config: Config, issuer: IssuerIdentity, now: dt.datetime) -> Times:
    """producedAt = now; thisUpdate = now − backdate, but never before the
    signer certificate's notBefore; nextUpdate = thisUpdate + validity, cut
    back to the signer certificate's notAfter (rules file).

    Raises ValueError, naming the signer certificate, when its notBefore is
    after ``now`` (thisUpdate would be in the future and after producedAt,
    RFC 6960 §4.2.2.1: a certificate not valid yet, or the CA's clock ahead
    of this host's), or when what is left leaves less than BR 4.9.9's
    8 hours.
    """
    signer = issuer.signer
    if signer.not_before > now:
        what = "responder" if signer.delegated else "issuer"
        raise ValueError(f"{what} certificate {signer.source} is not valid until {signer.not_before.isoformat()}: "
                         "nothing is signed with it before then (thisUpdate never in the future, RFC 6960 §4.2.2.1)")
    this_update = max(now - config.response.backdate, signer.not_before)
    next_update = min(this_update + config.response.validity, signer.not_after.replace(microsecond=0))
    if next_update - this_update + dt.timedelta(seconds=1) < MIN_INTERVAL:
        raise ValueError(f"signer certificate of {issuer.name} expires {signer.not_after.isoformat()}: "
                         "less than 8 h of validity left (BR 4.9.9)")
    return Times(now, this_update, next_update)


@dataclass
class _Batch:
    issuer: IssuerIdentity
    entries: list[LedgerEntry]
    whys: list[str]
    tbs: list[bytes]
    times: Times
    sent: float = field(default_factory=time.monotonic)


@dataclass
class _Upload:
    """A batch handed to the store, journaled once the store acknowledged it."""

    done: Future[list[str | None]]
    entries: list[LedgerEntry]
    records: list[Record]
    urgent: list[bool]  # purge the CDN (``purges_for`` the planner's reason)
    sent: float = field(default_factory=time.monotonic)


class Observer(Protocol):
    """Timing hooks (`ocspmint refresh` metrics); seconds are monotonic."""

    def signed(self, seconds: float, count: int) -> None:
        """A batch of ``count`` came back from its signer process ``seconds``
        after it was sent (signed, and verified with ``signing.verify``)."""

    def uploaded(self, seconds: float, count: int) -> None:
        """The store acknowledged a batch ``seconds`` after it was handed over."""

    def journaled(self, entries: list[LedgerEntry]) -> None:
        """These entries are now published (stored, acknowledged, journaled)."""


PURGE_REASONS = ("changed", "signer")  # the served bytes must change at once


def purges_for(why: str, force: Force | None) -> bool:
    """Whether a response signed for reason ``why`` must reach the CDN at once."""
    return why in PURGE_REASONS or (why == "forced" and force is not None and force.purge)


def _responses(reply: Signed | Checked | Failed) -> int:
    """How many responses a held reply carries (a failed batch: none)."""
    if isinstance(reply, Checked):
        return len(reply.responses)
    return len(reply.signatures) if isinstance(reply, Signed) else 0


class Runner:
    """One run: holds the open journal, store and templates.

    An entry due because its served status or signer changed (or forced
    with purge) queues a purge for every target with its journal row
    (``purges_for``). ``sample``: when set, gets every entry journaled
    (`verify_served`). ``force``: a reissue's reason, journaled as ``why``
    of every entry it signs. ``observer`` gets timings (refresh's metrics).
    """

    MAX_UPLOADS = 4  # batches in the store's hands at once
    MAX_HELD = 32_768  # signed responses held while the plan runs (``hold``): ~32 MB with a delegate's certificate
    # Acknowledged responses journaled together: one transaction rewrites the
    # journal's b-tree pages it touches, so fewer, larger ones cost less per row
    # (27 µs per row at 256 a transaction, 17 at 4,096, 50k-row journal). A run
    # killed before the write re-signs them at its next start, nothing more.
    JOURNAL_ROWS = 4096
    JOURNAL_SECONDS = 0.25

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], journal: Journal, store: Store, summary: Summary) -> None:
        self.config, self.issuers, self.journal, self.store, self.summary = config, issuers, journal, store, summary
        hashes = tuple(config.response.certid_hashes)
        self.templates = {n: ResponseTemplate(i, hashes) for n, i in issuers.items()}
        self.batches: dict[int, _Batch] = {}
        self.uploads: deque[_Upload] = deque()
        self.acked: list[tuple[LedgerEntry, Record, bool]] = []  # stored, not journaled yet
        self.journaled_at = time.monotonic()
        self.targets = [t.name for t in config.purge]
        self.sample: Sample | None = None
        self.force: Force | None = None
        self.observer: Observer | None = None
        self.excluded: Container[tuple[str, int]] = ()  # (issuer, serial) never to publish: ledger conflicts
        # by planned reason, the entries whose certificate expired by their batch's producedAt (a long pass
        # judged expiry at its start): never signed (``make_batch``); ``counted`` moves them to "expired"
        self.expired_late: Counter[str] = Counter()
        self.held: list[Signed | Checked | Failed] = []
        self._released = threading.Event()
        self._released.set()

    def hold(self) -> None:
        """Keep the batches that come back (signed or failed) unpublished
        and unreported until ``release``: while the plan runs, a serial it
        will find in conflict may already be signed (``MAX_HELD`` responses
        at most), or its batch may have failed (reported once, by the ledger)."""
        self._released.clear()

    def release(self, excluded: Container[tuple[str, int]]) -> None:
        """Publish what was held (at the next ``settle``) and what comes
        next, but for entries whose (issuer, serial) is in ``excluded``.
        Called from the planning thread once the plan is complete."""
        self.excluded = excluded
        self._released.set()

    def held_full(self) -> bool:
        """Whether no more batches should be sent before ``release``."""
        return not self._released.is_set() and sum(map(_responses, self.held)) >= self.MAX_HELD

    def make_batch(self, batch_id: int, issuer: str, planned: list[Planned]) -> SignBatch | None:
        """Encode one batch's ResponseData (None: all of it failed)."""
        ident, template = self.issuers[issuer], self.templates[issuer]
        try:
            times = batch_times(self.config, ident, utc_now())
            fields = template.time_fields(times)
        except ValueError as e:
            self.fail_all([entry for entry, _ in planned], "sign", str(e))
            return None
        planned = self._unexpired(planned, times.produced_at)
        if not planned:
            return None
        tbs, kept, whys = [], [], []
        for e, why in planned:
            try:
                tbs.append(template.tbs(e, fields))
                kept.append(e)
                whys.append(why)
            except ValueError as err:
                self.fail(e, "sign", str(err))
        self.batches[batch_id] = _Batch(ident, kept, whys, tbs, times)
        if not self.config.signing.verify:
            return SignBatch(batch_id, issuer, tbs)
        validity = int((times.next_update - times.this_update).total_seconds())
        return SignBatch(batch_id, issuer, tbs, [expect(e) for e in kept], validity)

    def _unexpired(self, planned: list[Planned], produced_at: dt.datetime) -> list[Planned]:
        """``planned`` but the entries whose certificate expired by
        ``produced_at`` (a long pass judged expiry at its start; the
        planner does not sign an entry already expired then): those are
        neither signed nor journaled, nor failures; ``expired_late``
        counts them."""
        kept = []
        for e, why in planned:
            if e.not_after > produced_at:
                kept.append((e, why))
            else:
                self.expired_late[why] += 1
        return kept

    def counted(self, planned: Counter[str]) -> Counter[str]:
        """The planner's ``planned`` counts (reason -> entries) with the
        entries ``make_batch`` found expired moved from their reason to
        "expired", as the planner counts an entry expired at its start:
        what ``Summary.finish`` takes once signing is over."""
        counts = planned.copy()
        for why, n in self.expired_late.items():
            counts[why] -= n
            counts["expired"] += n
        return +counts

    def fail(self, e: LedgerEntry, stage: str, message: str) -> None:
        self.summary.failures.append(Failure(stage, message, e.issuer, serial_hex(e.serial), e.source))

    def fail_all(self, entries: list[LedgerEntry], stage: str, message: str) -> None:
        for e in entries:
            self.fail(e, stage, message)

    def failed(self, reply: Failed) -> None:
        """Report a batch that failed signing, serial by serial (held while
        ``hold`` is in force; a serial in ``excluded`` is not reported again)."""
        if not self._released.is_set():
            self.held.append(reply)
            return
        b = self.batches.pop(reply.batch)
        self.fail_all([e for e in b.entries if not self._excluded(e)], "sign", reply.error)

    def _excluded(self, e: LedgerEntry) -> bool:
        return bool(self.excluded) and (e.issuer, e.serial) in self.excluded

    def signed(self, reply: Signed | Checked) -> None:
        """Hand the responses of one signed batch to the store: those the
        worker verified (``Checked``; the others are failures of stage
        "verify"), or, without ``signing.verify``, those assembled from the
        signatures (``Signed``); held while ``hold`` is in force."""
        if not self._released.is_set():
            self.held.append(reply)
            return
        self._store(reply)
        self.settle(self.MAX_UPLOADS)

    def _store(self, reply: Signed | Checked) -> None:
        b = self.batches.pop(reply.batch)
        if self.observer is not None:
            self.observer.signed(time.monotonic() - b.sent, len(b.entries))
        if isinstance(reply, Checked):
            responses, findings = reply.responses, reply.findings
        elif self.config.signing.verify:  # sent with ``expect``: never publish what no verifier saw
            self.fail_all(b.entries, "verify", "the signer process returned the batch without verifying it")
            return
        else:
            template = self.templates[b.issuer.name]
            responses = [template.response(tbs, sig) for tbs, sig in zip(b.tbs, reply.signatures, strict=True)]
            findings = [""] * len(responses)
        items, entries, records, urgent = [], [], [], []
        times, signer, issuer_id = b.times, b.issuer.signer.key_hash.hex(), b.issuer.id
        schedule = RefreshSchedule(times.this_update, times.next_update, self.config.response.refresh_after)
        for entry, why, response, found in zip(b.entries, b.whys, responses, findings, strict=True):
            if self._excluded(entry):  # the ledger stage reported it
                continue
            if found:
                self.fail(entry, "verify", found)
                continue
            items.append(PutItem(object_key(issuer_id, entry.serial), response, times.this_update, times.next_update))
            entries.append(entry)
            urgent.append(purges_for(why, self.force))
            reason = None if entry.reason is None else int(entry.reason)
            if self.force is not None:
                why = self.force.why
            records.append(Record(entry.issuer, entry.serial, times.this_update, times.next_update, entry.status.value,
                                  entry.revoked_at, reason, signer, hashlib.sha256(response).digest(), why,
                                  entry.kind.value, entry.not_after, schedule.at(entry.serial, entry.not_after),
                                  times.produced_at))
        if items:
            self.uploads.append(_Upload(self.store.submit(items), entries, records, urgent))

    def settle(self, keep: int) -> None:
        """Take every upload the store has acknowledged, oldest first,
        blocking while more than ``keep`` are outstanding, and journal
        them (``flush``) once JOURNAL_ROWS wait or JOURNAL_SECONDS passed
        since the last journal write; ``keep`` 0 drains the store and
        journals everything. Held batches go first once released."""
        if self.held and self._released.is_set():
            held, self.held = self.held, []
            for reply in held:
                if isinstance(reply, Failed):
                    self.failed(reply)
                else:
                    self._store(reply)
        while self.uploads and (len(self.uploads) > keep or self.uploads[0].done.done()):
            up = self.uploads.popleft()
            errors = up.done.result()
            if self.observer is not None:
                self.observer.uploaded(time.monotonic() - up.sent, len(up.entries))
            for entry, record, urgent, error in zip(up.entries, up.records, up.urgent, errors, strict=True):
                if error is None:
                    self.acked.append((entry, record, urgent))
                else:
                    self.fail(entry, "store", error)
        if self.acked and (keep == 0 or len(self.acked) >= self.JOURNAL_ROWS
                           or time.monotonic() - self.journaled_at >= self.JOURNAL_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Journal the acknowledged responses (and queue their purges) in
        one transaction; only then are they counted as published."""
        purge = [(entry.issuer, entry.serial) for entry, _, urgent in self.acked if urgent]
        self.journal.record([record for _, record, _ in self.acked], purge, self.targets)
        for entry, _, urgent in self.acked:
            self.summary.count(entry.issuer, entry.status.value, entry.kind.value)
            if self.sample is not None:
                self.sample.add(entry, urgent)
        if self.config.signing.verify:
            self.summary.verified += len(self.acked)
        if self.observer is not None:
            self.observer.journaled([entry for entry, _, _ in self.acked])
        self.acked = []
        self.journaled_at = time.monotonic()


def probe_keys(pool: SignerPool, runner: Runner) -> None:
    """Sign one throwaway ResponseData per issuer and check it with the
    signer certificate: a token key that does not match the configured
    certificate stops the run before anything is published."""
    for n, ident in enumerate(runner.issuers.values()):
        tbs = b"ocspmint key probe " + ident.id.encode()
        pool.submit(SignBatch(-1 - n, ident.name, [tbs]))
        replies = []
        while not replies:
            replies = list(pool.collect(30))
        reply = replies[0]
        if isinstance(reply, Failed):
            raise SignerError(f"issuer {ident.name}: probe signature failed: "
                              f"{reply.error.removeprefix(f'issuer {ident.name}: ')}")
        if not signature_valid(ident.signer, tbs, reply.signatures[0]):
            key = f"token key {ident.config.signer.uri}" if ident.config.signer.uri else \
                f"key file {ident.config.signer.key_file}"
            raise SignerError(f"issuer {ident.name}: the {key} does not match "
                              f"the signer certificate {ident.config.signer.cert or ident.config.cert}")


def _chunks(due: Iterable[Planned | None], size: int) -> Iterator[tuple[str, list[Planned]] | None]:
    """Batches of up to ``size`` entries of one issuer, as ``due`` streams
    by (memory: one partial batch per issuer); a None in ``due`` (nothing
    more for now) is passed on."""
    by_issuer: dict[str, list[Planned]] = {}
    for p in due:
        if p is None:
            yield None
            continue
        batch = by_issuer.setdefault(p[0].issuer, [])
        batch.append(p)
        if len(batch) >= size:
            yield p[0].issuer, by_issuer.pop(p[0].issuer)
    yield from by_issuer.items()


def sign_all(pool: SignerPool, runner: Runner, due: Iterable[Planned | None], progress: Progress | None,
             rate: float = 0.0, stopping: Callable[[], bool] = lambda: False) -> list[Planned]:
    """Sign, verify, store and journal ``due`` through ``pool``, at most
    ``rate`` responses/s (0: as fast as the pool goes); a None in ``due``
    means nothing more is due for now (a plan still running, see
    ``Spool.entries``), so replies are collected meanwhile. Every entry ends
    published or in ``runner.summary.failures``, except those not yet
    dispatched when ``stopping()`` turned True, which are returned (handed
    back). Ends with the store drained (``runner.settle(0)``)."""
    size = runner.config.signing.batch_size
    chunks = _chunks(due, min(size, max(1, int(rate / 4))) if rate else size)  # ~4 batches/s keep a rate smooth
    start, dispatched, done0 = time.monotonic(), 0, runner.summary.published + len(runner.summary.failures)
    handed_back: list[Planned] = []
    try:
        next_id, exhausted = 0, False
        while not exhausted or pool.busy():
            wait = 1.0
            if not exhausted and stopping():
                handed_back = [p for chunk in chunks if chunk for p in chunk[1]]
                exhausted = True
            while not exhausted and pool.has_capacity():
                if rate and (ahead := start + dispatched / rate - time.monotonic()) > 0:
                    wait = min(wait, ahead)
                    break
                if runner.held_full():  # until the plan is complete
                    wait = min(wait, 0.05)
                    break
                runner.journal.check_clock(utc_now())  # ClockError: sign nothing more
                chunk = next(chunks, _END)
                if chunk is None:  # ``due`` waited already
                    wait = 0
                    break
                if chunk is _END:
                    exhausted = True
                    break
                batch = runner.make_batch(next_id, *chunk)
                next_id += 1
                dispatched += len(chunk[1])
                if batch is not None:
                    pool.submit(batch)
            for reply in pool.collect(wait if pool.busy() else 0):
                if isinstance(reply, Failed):
                    runner.failed(reply)
                else:
                    runner.signed(reply)
            if not pool.busy() and not exhausted and wait < 1.0:
                time.sleep(wait)
            runner.settle(runner.MAX_UPLOADS)
            if progress:
                progress.update(runner.summary.published + len(runner.summary.failures) - done0)
        runner.summary.signer_restarts = pool.restarts
    except (SignerError, ClockError) as e:
        stage = "clock" if isinstance(e, ClockError) else "sign"
        for batch in runner.batches.values():
            runner.fail_all(batch.entries, stage, str(e))
        runner.batches.clear()
        runner.held.clear()  # their batches were just failed
        for chunk in chunks:
            if chunk:
                runner.fail_all([entry for entry, _ in chunk[1]], stage, str(e))
    finally:
        runner.settle(0)
        if progress:
            progress.close()
    return handed_back
