"""`ocspmint run`: ledger → planner → signer pool → verifier → store →
journal → invalidator (purge queue) → served check (verify_served).

``run(config)`` returns a Summary; ``summary.ok`` is False when anything
due was not published and verified (the CLI then exits 1). Nothing is
journaled before the store acknowledged it, and nothing is stored that
failed verification (docs/ocsp-rules.md).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import threading
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import closing, nullcontext

from ocspmint.config import Config
from ocspmint.incremental import LedgerMark
from ocspmint.invalidator import invalidate
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.journal import (STATEMENTS_BATCH, WITHHELD_EXAMPLES, ClockError, FirstStatements, Journal, LedgerKeys,
                              Withheld)
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, LedgerError, Reason, RowRemoved, serial_hex, utc_now
from ocspmint.planner import Force, Planner, Spool
from ocspmint.report import Failure, Progress, Summary
from ocspmint.runner import Planned, Runner, probe_keys, sign_all
from ocspmint.served import Sample, check_served
from ocspmint.signer import PoolStart, SignerError, signer_pool
from ocspmint.store import open_store

Select = Callable[[LedgerEntry], bool]
PLAN_CACHE_KIB = 8 * 1024  # the full pass's journal connection: reads only
__all__ = ["Force", "LedgerStop", "Plan", "Planned", "checked_entries", "ledger_entries", "make_planner",
           "report_unrevoked", "run", "stated_differently"]


class LedgerStop(Exception):
    """on_error = "stop" and a ledger row was bad."""


def checked_entries(config: Config, issuers: dict[str, IssuerIdentity], items: Iterator[LedgerEntry | LedgerError],
                    summary: Summary, conflicts: set[tuple[str, int]] | None = None) -> Iterator[LedgerEntry]:
    """The good entries of ``items``; bad rows (and rows of an issuer not
    configured) stop the run (LedgerStop) or are quarantined into
    ``summary.failures`` per ``config.on_error``. A bad row that names a
    serial (a duplicate) adds it to ``conflicts``: not published at all."""
    for item in items:
        if isinstance(item, LedgerEntry) and item.issuer not in issuers:
            item = LedgerError(item.source, f"issuer {item.issuer!r} is not configured")
        if isinstance(item, LedgerError):
            issuer, serial = item.key or ("", 0)
            summary.failures.append(Failure("ledger", item.message, issuer, serial_hex(serial) if serial else "", item.source))
            if item.key is not None and conflicts is not None:
                conflicts.add(item.key)
            if config.on_error == "stop":
                raise LedgerStop(str(item))
            continue
        yield item


def forgetting_unknown(items: Iterable[LedgerEntry | LedgerError], journal: Journal, config: Config,
                       pending: Container[tuple[str, int]] = ()) -> Iterator[LedgerEntry | LedgerError]:
    """``items`` (a reader's changes), taking every serial whose ledger
    state is unknown off the journal's schedule (``Journal.forget``): a
    row in error that names it, as it passes, or a row gone
    (``RowRemoved``), at the end. Routine re-signing reads the journal
    alone and would publish its old status again; the row stays a ledger
    failure naming the serial (``checked_entries``), and a row made right
    is scheduled again. A row gone of a serial nothing is served for
    (``_served``: an expired certificate's row pruned, a row never
    published) is dropped: no failure; unless its key is in ``pending``
    (a change the caller still means to publish: `refresh`'s pending
    changes, which the row gone must cancel).

    The sweep's guard (``[sweep]``, ``absent_limit``) holds for the rows
    gone too: when more of an issuer's rows are gone in one read than its
    limit, none of them leaves the schedule and they are one error row
    (``withheld``), not one each. Memory: the rows gone, up to the limit."""
    limit = absent_limit(config)
    gone: dict[str, _Gone] = {}
    for item in items:
        if isinstance(item, RowRemoved) and item.key is not None:
            if item.key in pending or _served(journal, item.key):
                gone.setdefault(item.key[0], _Gone()).add(item, journal, limit)
            continue
        if isinstance(item, LedgerError) and item.key is not None:
            journal.forget([item.key])
        yield item
    for issuer, rows in gone.items():
        if (held := rows.withheld(issuer)) is not None:
            yield LedgerError(rows.rows[0].source, withheld(config, held, _GONE_FOUND, _GONE_THEN))
        else:
            journal.forget([r.key for r in rows.rows if r.key is not None])
            yield from rows.rows


class _Gone:
    """The rows gone of one issuer in one read of changes
    (``forgetting_unknown``): kept while their count is within the guard's
    limit, counted past it."""

    def __init__(self) -> None:
        self.rows: list[RowRemoved] = []
        self.count = 0
        self.scheduled = 0
        self.most: int | None = None  # the limit, known once more than limit(0) rows are gone

    def add(self, row: RowRemoved, journal: Journal, limit: Callable[[int], int]) -> None:
        assert row.key is not None
        self.count += 1
        if self.most is None and self.count > limit(0):
            self.scheduled = journal.scheduled_count(row.key[0], utc_now())
            self.most = limit(self.scheduled)
        if self.most is None or self.count <= self.most:
            self.rows.append(row)

    def withheld(self, issuer: str) -> Withheld | None:
        """The guard's verdict: None when every row gone may leave the schedule."""
        if self.most is None or self.count <= self.most:
            return None
        examples = [r.key[1] for r in self.rows[:WITHHELD_EXAMPLES] if r.key is not None]
        return Withheld(issuer, self.count, self.scheduled, self.most, examples)


_GONE_FOUND = "the ledger's changes removed the rows of"
_GONE_THEN = ("raise [sweep] max_absent_fraction (1.0: no limit), then reload `ocspmint refresh` (SIGHUP) or make a "
              "full `ocspmint run`: the full pass's sweep takes them off")


def _served(journal: Journal, key: tuple[str, int]) -> bool:
    """Whether the journal holds a response of (issuer, serial) that is
    still served: journaled, its certificate not known expired and its
    nextUpdate not passed."""
    rec = journal.get(*key)
    now = utc_now()
    return rec is not None and rec.next_update > now and (rec.not_after is None or rec.not_after > now)


ABSENT = ("published and scheduled, but no longer in the ledger: no source holds a row naming it (its row was "
          "deleted, its index line removed or its certificate file removed or unreadable, while no run or refresh "
          "followed the ledger's changes): no longer re-signed, served until its nextUpdate; restore the row, or "
          "remove the response with `ocspmint audit --fix`")


def report_absent(config: Config, issuers: dict[str, IssuerIdentity], journal: Journal, summary: Summary,
                  keys: LedgerKeys, now: dt.datetime) -> None:
    """After a complete full pass (every source read to its end, none
    unusable: a pass stopped early must not call it, since what it did
    not read would be absent): every serial the journal schedules that
    no source holds (``Journal.forget_absent``: ``sqlite`` ledgers are
    probed, the keys the pass read from the others are in ``keys``,
    filled by ``ledger_entries``) leaves the schedule and is a ledger
    failure naming issuer and serial, once (it is no longer scheduled
    after). Routine re-signing reads the journal, not the ledger, and
    would sign it ``good`` for ever. A serial whose rows all expired at
    ``now`` (the planner's) is retired with the ledger's notAfter, not
    reported. A sqlite source that is not a file (ATTACH would make an
    empty ledger: every serial absent) makes it do nothing.

    The guard (``[sweep]``, ``absent_limit``): an issuer with more
    absent serials than its limit keeps them all scheduled and is one
    ledger failure (``withheld``) instead of one per serial."""
    ledgers = [source.path for source in config.sources if source.type == "sqlite"]
    if not config.sources or not all(os.path.isfile(path) for path in ledgers):
        return
    swept = journal.forget_absent(ledgers, keys, issuers, now, absent_limit(config))
    for issuer, serial in swept.forgotten:
        summary.failures.append(Failure("ledger", ABSENT, issuer, serial_hex(serial)))
    for held in swept.withheld:
        summary.failures.append(Failure("ledger", withheld(config, held), held.issuer))


def absent_limit(config: Config) -> Callable[[int], int]:
    """The most absent serials one sweep may forget of an issuer with a
    given number of scheduled, unexpired records (``[sweep]``):
    max(max_absent, ⌊max_absent_fraction × scheduled⌋)."""
    sweep = config.sweep
    return lambda scheduled: max(sweep.max_absent, int(sweep.max_absent_fraction * scheduled))


_SWEEP_FOUND = "the sweep would forget"
_SWEEP_THEN = "raise [sweep] max_absent_fraction (1.0: no limit) for one run"


def withheld(config: Config, held: Withheld, found: str = _SWEEP_FOUND, then: str = _SWEEP_THEN) -> str:
    """The ledger failure of an issuer the guard held back: what was
    ``found`` with the numbers, example serials, the sources to check,
    how to let it through (``then``)."""
    examples = ", ".join(serial_hex(s) for s in held.examples)
    sources = ", ".join(f"{s.type} {s.path}" for s in config.sources)
    return (f"{found} {held.absent} of {held.scheduled} scheduled serials of issuer {held.issuer!r}, more than "
            f"the limit of {held.limit} ([sweep] max_absent = {config.sweep.max_absent}, max_absent_fraction = "
            f"{config.sweep.max_absent_fraction:g}): no source holds a row naming them (e.g. {examples}); none was "
            "forgotten, all stay scheduled and re-signed. A ledger source read as complete but (nearly) empty (a "
            f"truncated index, an empty certificate folder, a ledger restored from an old backup)? check the ledger "
            f"sources ({sources}); if the removal is meant, {then}")


def holding(items: Iterable[LedgerEntry | LedgerError], keys: LedgerKeys,
            issuers: Container[str]) -> Iterator[LedgerEntry | LedgerError]:
    """``items`` (one source's rows), recording in ``keys`` the key of each
    entry of a configured issuer and of each row in error naming one."""
    for item in items:
        if isinstance(item, LedgerEntry):
            if item.issuer in issuers:
                keys.add(item.issuer, item.serial, item.not_after)
        elif item.key is not None and item.key[0] in issuers:
            keys.add(*item.key, None)
        yield item


def _statement(e: LedgerEntry) -> tuple[object, ...]:
    return e.status, e.revoked_at, e.reason


def stated_differently(first: LedgerEntry, entry: LedgerEntry) -> LedgerError | None:
    """``entry`` and ``first``, the same (issuer, serial) read before from
    another source: None when they state it alike, else the ledger error
    naming the serial (``key``), which must then not be published at all.
    Shared by ``ledger_entries`` and the audit."""
    if _statement(first) == _statement(entry):
        return None
    return LedgerError(entry.source, f"serial stated differently: {first.status.value} by {first.source}, "
                                     f"{entry.status.value} by {entry.source}; neither is published",
                       (entry.issuer, entry.serial))


def ledger_entries(config: Config, issuers: dict[str, IssuerIdentity], summary: Summary,
                   conflicts: set[tuple[str, int]] | None = None, keys: LedgerKeys | None = None) -> Iterator[LedgerEntry]:
    """Every good entry of every source (see ``checked_entries``), each
    (issuer, serial) once: with several sources, a serial they state alike
    comes once, and one they state differently (one says revoked, the
    other good) is a ledger failure added to ``conflicts``, whose entries
    the caller must not publish (``once_stated``). ``keys``: the key of
    every row of a source that is not ``sqlite`` goes there too
    (``holding``), for ``report_absent``. Memory: flat; with more than one
    source, the first statement of each key is kept in a temporary SQLite
    database (``journal.FirstStatements``; docs/ledger.md, "several
    sources"), closed with this generator. An unusable source raises
    LedgerStop."""
    with FirstStatements() if len(config.sources) > 1 else nullcontext() as stated:
        for source in config.sources:
            try:
                items = read_source(source, issuers)
                if keys is not None and source.type != "sqlite":
                    items = holding(items, keys, issuers)
                if stated is None:
                    yield from checked_entries(config, issuers, items, summary, conflicts)
                else:
                    yield from once_stated(config, issuers, items, summary, stated, conflicts)
            except LedgerError as e:
                summary.failures.append(Failure("ledger", e.message, source=e.source))
                raise LedgerStop(str(e)) from None


def once_stated(config: Config, issuers: dict[str, IssuerIdentity], items: Iterator[LedgerEntry | LedgerError],
                summary: Summary, stated: FirstStatements,
                conflicts: set[tuple[str, int]] | None = None) -> Iterator[LedgerEntry]:
    """The good entries of one source's ``items`` (``checked_entries``)
    whose key no earlier entry of the pass stated (``stated`` records
    them); an entry stating a key otherwise than its first statement is a
    ledger failure (``stated_differently``) added to ``conflicts``, and
    LedgerStop when ``config.on_error`` is "stop". Looks the keys up a
    batch of STATEMENTS_BATCH rows at a time, then reports and yields row
    by row, in the order read, as a lookup per row would."""
    for batch in _batches(items, STATEMENTS_BATCH):
        good = [item for item in batch if isinstance(item, LedgerEntry) and item.issuer in issuers]
        firsts = dict(zip(map(id, good), stated.first(good)))
        for entry in checked_entries(config, issuers, iter(batch), summary, conflicts):
            first = firsts[id(entry)]
            if first is entry:
                yield entry
            elif (differs := stated_differently(first, entry)) is not None:
                summary.failures.append(Failure("ledger", differs.message, entry.issuer, serial_hex(entry.serial),
                                                entry.source))
                if conflicts is not None:
                    conflicts.add((entry.issuer, entry.serial))
                if config.on_error == "stop":
                    raise LedgerStop(f"{entry.source}: serial {entry.serial:#x} stated differently by two sources")


def _batches(items: Iterator[LedgerEntry | LedgerError], size: int) -> Iterator[list[LedgerEntry | LedgerError]]:
    """``items`` in lists of ``size`` (the last one shorter); when
    ``items`` raises (an unusable source), the items read before it come
    first, then the error."""
    batch: list[LedgerEntry | LedgerError] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def report_unrevoked(planner: Planner, summary: Summary) -> None:
    """A ledger failure for each entry that said good for a serial published
    revoked (``Planner.unrevoked``): the revocation stands and is refreshed,
    and the run must not end ok while the ledger contradicts it."""
    for entry, rec in planner.unrevoked:
        revoked = "no time" if rec.revoked_at is None else f"{rec.revoked_at:%Y-%m-%dT%H:%M:%SZ}"
        reason = "" if rec.reason is None else f", {Reason(rec.reason).name}"
        summary.failures.append(Failure(
            "ledger", f"the ledger says good, but this serial was published revoked ({revoked}{reason}); a "
                      "revocation is final (RFC 5280 §5.3.1, BR 4.9.13): the revoked response stands and is "
                      "refreshed; correct the ledger", entry.issuer, serial_hex(entry.serial), entry.source))
    planner.unrevoked.clear()


def make_planner(config: Config, issuers: dict[str, IssuerIdentity], journal: Journal, force: Force | None = None) -> Planner:
    """The planner of a run starting now."""
    return Planner(journal, {n: i.signer.key_hash.hex() for n, i in issuers.items()},
                   config.response.refresh_after, utc_now(), force)


def run(config: Config, show_progress: bool = True, *, select: Select | None = None, force: Force | None = None,
        rate: float = 0.0, incremental: bool = False) -> Summary:
    """Sign, verify and publish everything due; see the module docstring.

    ``select`` keeps only the ledger entries it returns True for (a
    reissue's selection); ``force`` makes every selected entry due (reason
    ``forced``) unless the journal shows it re-signed since ``force.since``
    (so an interrupted reissue resumes); ``rate`` caps responses/s (0: no
    cap); ``incremental`` plans from the ledger's changes and the
    journal's schedule instead of a full pass when it can (module
    ``incremental``). A full pass runs on its own thread while what it
    found due is signed (``Plan``). Raises IdentityError/UriError for
    unusable issuer or signer settings.
    """
    summary = Summary(started=dt.datetime.now(dt.timezone.utc))
    issuers = load_issuers(config)
    signers = PoolStart(signer_pool(config, issuers))
    with Journal(config.state_dir) as journal, Spool(config.state_dir) as spool, signers:
        planner = make_planner(config, issuers, journal, force)
        mark = LedgerMark(config, issuers, journal)
        try:
            journal.check_clock(planner.now)
        except ClockError as e:
            summary.failures.append(Failure("clock", str(e)))
            summary.finish(planner.counts)
            return summary
        store = open_store(config.store.url, config.store)
        runner = Runner(config, issuers, journal, store, summary)
        runner.force = force
        if config.verify_served.url:
            runner.sample = Sample(config.verify_served.sample)
        plan = Plan(config, issuers, planner, summary, spool, select, runner)
        why_full = mark.why_full() if incremental else None
        try:
            if incremental and why_full is None:
                plan.incremental(mark)
            else:
                summary.plan = f"full ({why_full})" if why_full else "full"
                signers.start()  # the workers log in while the ledger is read
                plan.start_full(mark)
            _sign(signers, runner, spool, show_progress, rate)
        except LedgerStop:  # nothing was published: the Runner holds what it gets until the plan is complete
            summary.finish(runner.counted(plan.join().counts))
            return summary
        finally:
            plan.stop()
            plan.join()
            signers.close()
            runner.settle(0)
            store.close()
        summary.purges = invalidate(config, issuers, journal)
        if config.verify_served.url:
            summary.served_checked, failures = check_served(config, issuers, journal, runner.sample)
            summary.failures.extend(failures)
        summary.finish(runner.counted(plan.join().counts))
        if summary.ok and select is None and force is None:
            mark.save()
        if summary.published:
            journal.add_run(summary.started, summary.seconds, summary.published)
    return summary


def _sign(signers: PoolStart, runner: Runner, spool: Spool, show_progress: bool, rate: float) -> None:
    """Sign what ``spool`` gets from the plan, from its first entry on
    (no signer is used when nothing is due); a pool that cannot start
    fails them all (stage "sign"). Raises LedgerStop from the plan."""
    due = spool.entries()
    first = next((p for p in due if p is not None), None)
    if first is None:
        return
    entries = itertools.chain([first], due)
    try:
        pool = signers.pool()
        runner.summary.signer_backend = pool.backends
        probe_keys(pool, runner)
        progress = Progress(lambda: len(spool) if spool.finished else None, "signing") if show_progress else None
        sign_all(pool, runner, entries, progress, rate)
    except SignerError as e:  # the pool could not start
        runner.fail_all([p[0] for p in entries if p is not None], "sign", str(e))


class Plan:
    """What is due, put in ``spool``: from a full ledger pass on a thread
    of its own (``start_full``), or, when the journal's mark allows it,
    from the ledger changes since the mark plus the journal's routine
    re-signing (``incremental``, module ``incremental``, done at once).

    While a full pass runs, ``runner`` holds the responses it gets
    (``Runner.hold``): a serial two sources state differently is known
    only at the end of the pass, and must not be published at all
    (``ledger_entries``). The pass uses a journal connection of its own
    (SQLite connections stay in their thread; WAL lets it read while the
    runner writes): it reads only rows of serials not planned yet, which
    the runner does not write. A LedgerStop ends the spool with it."""

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], planner: Planner, summary: Summary,
                 spool: Spool, select: Select | None, runner: Runner) -> None:
        self.config, self.issuers, self.planner, self.summary = config, issuers, planner, summary
        self.spool, self.select, self.runner = spool, select, runner
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # not Thread.join: see signer.PoolStart
        self._stopping = False

    def incremental(self, mark: LedgerMark) -> None:
        self.summary.plan = "incremental"
        conflicts: set[tuple[str, int]] = set()
        self.runner.excluded = conflicts
        changed = set()
        try:
            changes = forgetting_unknown(mark.changes(), self.runner.journal, self.config)
            for entry, why in self.planner.due(checked_entries(self.config, self.issuers, changes, self.summary,
                                                               conflicts), expired=True):
                changed.add((entry.issuer, entry.serial))
                self.spool.add((entry, why))
            self.planner.complete_records()  # a row put back after a deletion, a notAfter moved into the past
        except LedgerError as e:  # the database as a whole is unusable
            self.summary.failures.append(Failure("ledger", e.message, source=e.source))
            raise LedgerStop(str(e)) from None
        finally:
            report_unrevoked(self.planner, self.summary)
        for entry in mark.routine(self.issuers, self.planner.now, changed):
            self.planner.counts["refresh"] += 1
            self.spool.add((entry, "refresh"))
        self.spool.finish()

    def start_full(self, mark: LedgerMark) -> None:
        self.runner.hold()
        self._thread = threading.Thread(target=self._full, args=(mark,), name="plan", daemon=True)
        self._thread.start()

    def _full(self, mark: LedgerMark) -> None:
        try:
            self._pass(mark)
        finally:
            self._done.set()

    def _pass(self, mark: LedgerMark) -> None:
        conflicts: set[tuple[str, int]] = set()
        planner = self.planner
        try:
            # closing: the ledger's connections close in this thread, which opened them (so does ``keys``'s)
            with (Journal(self.config.state_dir, cache_kib=PLAN_CACHE_KIB) as own,
                  LedgerKeys(planner.now) as keys,
                  closing(ledger_entries(self.config, self.issuers, self.summary, conflicts, keys)) as entries):
                main = planner.journal
                planner.journal = own
                try:
                    mark.start()
                    for planned in planner.due(self._selected(entries)):
                        self.spool.add(planned)
                    planner.complete_records()
                    report_absent(self.config, self.issuers, own, self.summary, keys, planner.now)
                finally:
                    planner.journal = main
                    report_unrevoked(planner, self.summary)
                    own.forget(sorted(conflicts))  # their state is unknown: routine must not re-sign the journal's
        except BaseException as e:  # LedgerStop, or a journal error: the signing side raises it
            self.spool.fail(e)
            return
        self.runner.release(conflicts)
        self.spool.finish()

    def _selected(self, entries: Iterator[LedgerEntry]) -> Iterator[LedgerEntry]:
        for e in entries:
            if self._stopping:  # checked on every row: most rows of a ledger are not due
                raise LedgerStop("the run stopped before the ledger pass was complete")
            if self.select is None or self.select(e):
                yield e

    def stop(self) -> None:
        """End a full pass still running (the run ends early: an error)."""
        self._stopping = True

    def join(self) -> Planner:
        """Wait for a full pass; the planner (its ``counts``)."""
        if self._thread is not None:
            self._done.wait()
        return self.planner
