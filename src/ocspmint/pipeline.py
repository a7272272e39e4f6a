"""`ocspmint run`: ledger → planner → signer pool → verifier → store →
journal → invalidator (purge queue) → served check (verify_served).

``run(config)`` returns a Summary; ``summary.ok`` is False when anything
due was not published and verified (the CLI then exits 1). Nothing is
journaled before the store acknowledged it, and nothing is stored that
failed verification (docs/ocsp-rules.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from ocspmint.config import Config
from ocspmint.encoder import ResponseTemplate, Times
from ocspmint.invalidator import invalidate
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.journal import Journal, Record
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, LedgerError, serial_hex, utc_now
from ocspmint.planner import Planner
from ocspmint.report import Failure, Progress, Summary
from ocspmint.served import check_served
from ocspmint.signer import Failed, KeySpec, SignBatch, SignerError, SignerPool, key_spec
from ocspmint.store import PutItem, Store, object_key, open_store
from ocspmint.verifier import Expectation, signature_valid, verify_response

MIN_INTERVAL = dt.timedelta(hours=8)


class LedgerStop(Exception):
    """on_error = "stop" and a ledger row was bad."""


def ledger_entries(config: Config, issuers: dict[str, IssuerIdentity], summary: Summary) -> Iterator[LedgerEntry]:
    """Every entry of every source; bad rows stop the run or are
    quarantined into ``summary.failures`` per ``config.on_error``."""
    for source in config.sources:
        try:
            for item in read_source(source, issuers):
                if isinstance(item, LedgerEntry) and item.issuer not in issuers:
                    item = LedgerError(item.source, f"issuer {item.issuer!r} is not configured")
                if isinstance(item, LedgerError):
                    summary.failures.append(Failure("ledger", item.message, source=item.source))
                    if config.on_error == "stop":
                        raise LedgerStop(str(item))
                    continue
                yield item
        except LedgerError as e:
            summary.failures.append(Failure("ledger", e.message, source=e.source))
            raise LedgerStop(str(e)) from None


def batch_times(config: Config, issuer: IssuerIdentity, now: dt.datetime) -> Times:
    """producedAt = now; thisUpdate = now − backdate, but never before the
    signer certificate's notBefore; nextUpdate = thisUpdate + validity, cut
    back to the signer certificate's notAfter (rules file).

    Raises ValueError when that leaves less than BR 4.9.9's 8 hours.
    """
    this_update = max(now - config.response.backdate, issuer.signer.not_before)
    next_update = min(this_update + config.response.validity, issuer.signer.not_after.replace(microsecond=0))
    if next_update - this_update + dt.timedelta(seconds=1) < MIN_INTERVAL:
        raise ValueError(f"signer certificate of {issuer.name} expires {issuer.signer.not_after.isoformat()}: "
                         "less than 8 h of validity left (BR 4.9.9)")
    return Times(now, this_update, next_update)


@dataclass
class _Batch:
    issuer: IssuerIdentity
    entries: list[LedgerEntry]
    tbs: list[bytes]
    times: Times


@dataclass
class _Upload:
    """A batch handed to the store, journaled once the store acknowledged it."""

    done: Future[list[str | None]]
    entries: list[LedgerEntry]
    records: list[Record]


PURGE_REASONS = ("changed", "signer")  # the served bytes must change at once


class Runner:
    """One run: holds the open journal, store and templates.

    ``purge``: (issuer, serial) of due entries whose served status or
    signer changed; their journal rows queue a purge for every target.
    ``published``: (entry, validity) of everything journaled this run.
    """

    MAX_UPLOADS = 4  # batches in the store's hands at once

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], journal: Journal, store: Store, summary: Summary) -> None:
        self.config, self.issuers, self.journal, self.store, self.summary = config, issuers, journal, store, summary
        hashes = tuple(config.response.certid_hashes)
        self.templates = {n: ResponseTemplate(i, hashes) for n, i in issuers.items()}
        self.batches: dict[int, _Batch] = {}
        self.uploads: deque[_Upload] = deque()
        self.purge: set[tuple[str, int]] = set()
        self.targets = [t.name for t in config.purge]
        self.published: list[LedgerEntry] = []

    def make_batch(self, batch_id: int, issuer: str, entries: list[LedgerEntry]) -> SignBatch | None:
        ident, template = self.issuers[issuer], self.templates[issuer]
        try:
            times = batch_times(self.config, ident, utc_now())
        except ValueError as e:
            self.fail_all(entries, "sign", str(e))
            return None
        fields = template.time_fields(times)
        tbs, kept = [], []
        for e in entries:
            try:
                tbs.append(template.tbs(e, fields))
                kept.append(e)
            except ValueError as err:
                self.fail(e, "sign", str(err))
        self.batches[batch_id] = _Batch(ident, kept, tbs, times)
        return SignBatch(batch_id, issuer, tbs)

    def fail(self, e: LedgerEntry, stage: str, message: str) -> None:
        self.summary.failures.append(Failure(stage, message, e.issuer, serial_hex(e.serial), e.source))

    def fail_all(self, entries: list[LedgerEntry], stage: str, message: str) -> None:
        for e in entries:
            self.fail(e, stage, message)

    def failed(self, reply: Failed) -> None:
        b = self.batches.pop(reply.batch)
        self.fail_all(b.entries, "sign", reply.error)

    def signed(self, batch_id: int, signatures: list[bytes]) -> None:
        """Assemble and verify one signed batch, then hand it to the store."""
        b = self.batches.pop(batch_id)
        template = self.templates[b.issuer.name]
        expect_validity = b.times.next_update - b.times.this_update
        items, entries, records = [], [], []
        for entry, tbs, sig in zip(b.entries, b.tbs, signatures, strict=True):
            response = template.response(tbs, sig)
            if self.config.signing.verify:
                findings = verify_response(response, b.issuer, Expectation(entry, template.hashes, expect_validity), utc_now())
                if findings:
                    self.fail(entry, "verify", "; ".join(findings))
                    continue
            items.append(PutItem(object_key(b.issuer.id, entry.serial), response, b.times.this_update, b.times.next_update))
            entries.append(entry)
            reason = None if entry.reason is None else int(entry.reason)
            records.append(Record(entry.issuer, entry.serial, b.times.this_update, b.times.next_update, entry.status.value,
                                  entry.revoked_at, reason, b.issuer.signer.key_hash.hex(), hashlib.sha256(response).digest()))
        if items:
            self.uploads.append(_Upload(self.store.submit(items), entries, records))
        self.settle(self.MAX_UPLOADS)

    def settle(self, keep: int) -> None:
        """Journal every upload the store has acknowledged, oldest first,
        blocking while more than ``keep`` are outstanding (0: drain)."""
        while self.uploads and (len(self.uploads) > keep or self.uploads[0].done.done()):
            up = self.uploads.popleft()
            errors = up.done.result()
            kept, purge = [], []
            for entry, record, error in zip(up.entries, up.records, errors, strict=True):
                if error is not None:
                    self.fail(entry, "store", error)
                    continue
                kept.append(record)
                self.published.append(entry)
                self.summary.count(entry.issuer, entry.status.value, entry.kind.value)
                if (entry.issuer, entry.serial) in self.purge:
                    purge.append((entry.issuer, entry.serial))
            if self.config.signing.verify:
                self.summary.verified += len(kept)
            self.journal.record(kept, purge, self.targets)


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
            raise SignerError(f"issuer {ident.name}: probe signature failed: {reply.error}")
        if not signature_valid(ident.signer, tbs, reply.signatures[0]):
            raise SignerError(f"issuer {ident.name}: the token key {ident.config.signer.uri} does not match "
                              f"the signer certificate {ident.config.signer.cert or ident.config.cert}")


def _chunks(due: list[LedgerEntry], size: int) -> Iterator[tuple[str, list[LedgerEntry]]]:
    by_issuer: dict[str, list[LedgerEntry]] = {}
    for e in due:
        by_issuer.setdefault(e.issuer, []).append(e)
    for issuer, entries in by_issuer.items():
        for i in range(0, len(entries), size):
            yield issuer, entries[i : i + size]


def run(config: Config, show_progress: bool = True) -> Summary:
    """Sign, verify and publish everything due; see the module docstring.

    Raises IdentityError/UriError for unusable issuer or signer settings.
    """
    summary = Summary(started=dt.datetime.now(dt.timezone.utc))
    issuers = load_issuers(config)
    specs: list[KeySpec] = [key_spec(i) for i in issuers.values()]
    with Journal(config.state_dir) as journal:
        planner = Planner(journal, {n: i.signer.key_hash.hex() for n, i in issuers.items()},
                          config.response.refresh_after, utc_now())
        try:
            planned = list(planner.due(ledger_entries(config, issuers, summary)))
        except LedgerStop:
            summary.finish(planner.counts)
            return summary
        store = open_store(config.store.url, config.store)
        runner = Runner(config, issuers, journal, store, summary)
        try:
            runner.purge = {(e.issuer, e.serial) for e, why in planned if why in PURGE_REASONS}
            if planned:
                _sign_all(config, specs, runner, [e for e, _ in planned], show_progress)
        finally:
            runner.settle(0)
            store.close()
        summary.purges = invalidate(config, issuers, journal)
        if config.verify_served.url:
            summary.served_checked, failures = check_served(config, issuers, journal, runner.published, runner.purge)
            summary.failures.extend(failures)
    summary.finish(planner.counts)
    return summary


def _sign_all(config: Config, specs: list[KeySpec], runner: Runner, due: list[LedgerEntry], show_progress: bool) -> None:
    progress = Progress(len(due), "signing") if show_progress else None
    chunks = _chunks(due, config.signing.batch_size)
    try:
        with SignerPool(specs, config.signing.workers, config.signing.retries) as pool:
            probe_keys(pool, runner)
            next_id, exhausted = 0, False
            while not exhausted or pool.busy():
                while not exhausted and pool.has_capacity():
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                        break
                    batch = runner.make_batch(next_id, *chunk)
                    next_id += 1
                    if batch is not None:
                        pool.submit(batch)
                for reply in pool.collect(1.0):
                    if isinstance(reply, Failed):
                        runner.failed(reply)
                    else:
                        runner.signed(reply.batch, reply.signatures)
                runner.settle(runner.MAX_UPLOADS)
                if progress:
                    progress.update(runner.summary.published + len(runner.summary.failures))
            runner.summary.signer_restarts = pool.restarts
    except SignerError as e:
        for batch in runner.batches.values():
            runner.fail_all(batch.entries, "sign", str(e))
        for _, entries in chunks:
            runner.fail_all(entries, "sign", str(e))
    finally:
        if progress:
            progress.close()
