"""`ocspmint refresh`: the continuous service (docs/refresh.md).

Start-up (and every SIGHUP reload) opens the journal, store and signer pool
once, probes every issuer's key, remembers each ledger source's position
(``ledger.tail.Tail``), then catches up with one full planner pass, like
`ocspmint run`. After that, every ``refresh.tick``:

1. ledger changes since the last tick (new precertificates and
   certificates, revocations), and the pending ones whose backoff passed,
   are planned and signed first, uncapped: the BR 4.9.10 / MRSP 15-minute
   limit becomes seconds;
2. routine re-signing takes the journal records whose ``refresh_at`` came
   (an index range scan: cost grows with what is due, not with the
   ledger), at most ``refresh.routine_rate`` per second, but never a
   serial with a pending ledger change (its journal record states the old
   status); ``refresh_at`` is spread by serial over the second half of
   ``refresh_after`` (``planner.refresh_at``), so a population signed at
   once comes due spread out and the HSM sees a flat load.

As in `ocspmint run`, a serial two sources state differently (or a row in
error names) is published by neither the catch-up pass nor a tick
(``Session.held_back``) until the sources state it alike (``_recheck``).

A ledger change (catch-up or tick) that was not published stays pending in
``Session.pending`` and is planned again after a backoff of its own (1 s
doubling to ``refresh_purge.RETRY_MAX``) until it is published or the ledger and journal
agree; a reload hands it to the new Session. Queued CDN purges are sent by
one ``Purger`` thread per target, so a slow or dead target never delays
signing; what fails stays queued in the journal.

SIGTERM/SIGINT: stop dispatching, let the in-flight batches finish and be
journaled, exit 0 (what was not dispatched is simply due at the next
start). SIGHUP: at the next tick boundary, build and probe a Session from
the new config while the old one is still open; on any failure log
``reload_failed`` and keep serving with the old one. A ledger row that
cannot be read is logged and counted, never fatal: the service keeps every
other response fresh. Prometheus metrics on ``refresh.metrics_listen``
(``RefreshMetrics``).
"""

from __future__ import annotations

import datetime as dt
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ocspmint.config import Config, load_config
from ocspmint.issuer import load_issuers
from ocspmint.journal import ClockError, Journal, LedgerKeys
from ocspmint.ledger import read_source
from ocspmint.ledger.sqlite import ChangeLogError
from ocspmint.ledger.tail import Tail
from ocspmint.metrics import RefreshMetrics
from ocspmint.model import LedgerEntry, LedgerError, utc_now
from ocspmint.pipeline import (LedgerStop, checked_entries, forgetting_unknown, ledger_entries, make_planner,
                               report_absent, report_unrevoked)
from ocspmint.runner import Planned, Runner, probe_keys, sign_all
from ocspmint.planner import Spool, refresh_at, routine
from ocspmint.refresh_purge import Key, Purger, describe, log, retry_delay
from ocspmint.report import Failure, Summary
from ocspmint.signer import SignerError, signer_pool
from ocspmint.store import open_store

ROUTINE_MAX = 50_000  # journal records taken per tick at most
SCHEDULE_PAGE = 10_000
# seconds between reads of ``Journal.earliest_next_update``: a range scan, no index, 0.11-0.24 s per million
# scheduled records (a 1M-row journal, page cache warm); it alerts at hours, so minutes of lag are fine
EARLIEST_EVERY = 300.0


@dataclass(slots=True)
class Pending:
    """A ledger change not published yet: planned again from ``retry_at``
    (monotonic) on; ``failures`` in a row so far set the backoff."""

    entry: LedgerEntry
    failures: int
    retry_at: float


class _Runner(Runner):
    """The Runner of a Session: reports each failed entry to it (``fail``,
    through which every per-entry failure goes) and the purges it is about
    to queue (``flush``), before the journal transaction queues them."""

    def __init__(self, session: Session, summary: Summary) -> None:
        super().__init__(session.config, session.issuers, session.journal, session.store, summary)
        self.session = session
        self.observer = session

    def fail(self, e: LedgerEntry, stage: str, message: str) -> None:
        super().fail(e, stage, message)
        self.session.failed(e)

    def flush(self) -> None:
        keys = [(entry.issuer, entry.serial) for entry, _, urgent in self.acked if urgent]
        self.session.purging(keys)
        super().flush()
        if keys:
            self.session.poke_purgers()


class Session:
    """One loaded config: issuers, journal, store, signer pool, tails and
    purgers. ``Session(...)`` loads and opens (closing what it opened when
    something fails); entering it starts and probes the signer pool and
    starts the tails; ``catch_up`` starts the purgers and makes the full
    pass; then ``tick``. ``close`` (or leaving ``with``) is idempotent."""

    def __init__(self, config: Config, metrics: RefreshMetrics, stopping: Callable[[], bool]) -> None:
        self.config, self.metrics, self.stopping = config, metrics, stopping
        # a bad ledger row is logged and skipped whatever on_error says: the service keeps everything else fresh
        self.reading = msgspec.structs.replace(config, on_error="quarantine")
        self.issuers = load_issuers(config)
        self._open = ExitStack()
        try:
            self.journal = self._open.enter_context(Journal(config.state_dir))
            self.store = open_store(config.store.url, config.store)
            self._open.callback(self.store.close)
            self.pool = signer_pool(config, self.issuers)
            self._open.callback(self.pool.close)  # harmless before it started
            self.tails = [Tail(s, self.issuers) for s in config.sources]
        except BaseException:
            self._open.close()
            raise
        self.purgers = [Purger(config, self.issuers, t, metrics) for t in config.purge]
        configured = {t.name for t in config.purge}
        for name, count in sorted(self.journal.queued_by_target().items()):
            if name not in configured:  # renamed or removed: never sent (docs/purge.md says how to move them)
                log("purge_orphaned", target=name, pending=count,
                    message="purges queued under a [[purge]] name no longer configured: not sent")
        self._entered = False
        self.seen: dict[Key, float] = {}  # planned ledger change → when the ledger recorded it (Unix time)
        self.pending: dict[Key, Pending] = {}  # ledger changes not published yet
        self._seen_at = 0.0
        self.published: set[Key] = set()  # keys journaled by the current ``_sign``
        self._failed: dict[Key, LedgerEntry] = {}  # ledger changes failed in the current ``_sign``
        self._routine_keys: set[Key] = set()  # routine work of the current tick (stays due in the journal)
        self._earliest_at = 0.0  # monotonic time of the next ``earliest_next_update`` read (0: at the first ``_sign``)
        self.held_back: set[Key] = set()  # in conflict or error at the last full pass: not published (``_recheck``)

    def __enter__(self) -> Session:
        """Start the signer pool (once: a second pool would double the
        workers and HSM logins), probe every key, start the tails."""
        if self._entered:
            raise RuntimeError("a refresh Session is entered once")
        self._entered = True
        try:
            self.pool.__enter__()
            log("signer_started", backends=self.pool.backends, workers=self.pool.workers,
                sessions=self.config.signing.sessions)
            probe_keys(self.pool, self._runner(Summary(started=utc_now())))
            for tail in self.tails:
                tail.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for purger in self.purgers:
            purger.close()
        self._open.close()

    def adopt(self, old: Session) -> None:
        """Take over the ledger changes ``old`` (closed: a reload) did not
        publish, backoff included (issuers no longer configured: dropped;
        the catch-up pass reports their rows), and drop the purge gauges
        of targets no longer configured."""
        for key, p in old.pending.items():
            if key[0] in self.issuers:
                self.pending[key] = p
                if key in old.seen:
                    self.seen[key] = old.seen[key]
        self.metrics.changes_pending.set(len(self.pending))
        for target in {t.name for t in old.config.purge} - {t.name for t in self.config.purge}:
            try:
                self.metrics.purges_pending.remove(target)
            except KeyError:
                pass

    def _runner(self, summary: Summary) -> Runner:
        return _Runner(self, summary)

    # Observer (pipeline.Observer)
    def signed(self, seconds: float, count: int) -> None:
        self.metrics.sign_seconds.observe(seconds)

    def uploaded(self, seconds: float, count: int) -> None:
        self.metrics.upload_seconds.observe(seconds)

    def journaled(self, entries: list[LedgerEntry]) -> None:
        now = time.time()
        self.published.update((e.issuer, e.serial) for e in entries)
        for e in entries:
            self.metrics.published.labels(e.issuer).inc()
            self.pending.pop((e.issuer, e.serial), None)
            if (t := self.seen.pop((e.issuer, e.serial), None)) is not None:
                self.metrics.ledger_to_published.observe(now - t)

    # _Runner hooks
    def failed(self, entry: LedgerEntry) -> None:
        key = (entry.issuer, entry.serial)
        if key not in self._routine_keys:  # routine work stays due in the journal
            self._failed[key] = entry

    def purging(self, keys: list[Key]) -> None:
        for purger in self.purgers:
            purger.queued(keys)

    def poke_purgers(self) -> None:
        for purger in self.purgers:
            purger.poke()

    def catch_up(self) -> Summary:
        """Start the purgers, then plan and sign the whole ledger once (the
        tails remembered their position when the Session was entered)."""
        for purger in self.purgers:
            purger.start()
        self._reschedule_if_changed()
        summary = Summary(started=utc_now())
        planner = make_planner(self.config, self.issuers, self.journal)
        self._routine_keys = set()
        with Spool(self.config.state_dir) as spool:
            unknown: set[Key] = set()
            with LedgerKeys(planner.now) as keys:  # freed before signing
                complete = True
                try:
                    for planned in planner.due(ledger_entries(self.reading, self.issuers, summary, unknown, keys)):
                        spool.add(planned)
                except LedgerStop:  # a source is unusable: sign what was read; its Tail retries every tick
                    complete = False
                self.journal.forget(sorted(unknown))  # state unknown: routine must not re-sign the journal's
                planner.complete_records()
                if complete:  # only then is a serial no source gave absent
                    report_absent(self.reading, self.issuers, self.journal, summary, keys, planner.now)
            report_unrevoked(planner, summary)
            spool.finish()
            self.held_back = unknown  # as `run` excludes them (``Runner.release``): not published at all
            for key in unknown:  # a pending change of such a serial is dropped, as in ``tick``
                self.pending.pop(key, None)
                self.seen.pop(key, None)
            self._sign((p for p in spool.entries() if p is None or (p[0].issuer, p[0].serial) not in unknown),
                       summary, planner.counts)
        self._check_routine_rate(summary.ledger_entries - summary.expired)
        return summary

    def _check_routine_rate(self, population: int) -> None:
        """Log ``routine_rate_low`` when ``refresh.routine_rate`` (> 0) is
        below what re-signing ``population`` unexpired entries needs in
        the steady state. Each serial comes due at a fixed fraction between
        refresh_after/2 and refresh_after after its thisUpdate
        (``planner.refresh_at``), so the mean rate is population × 2 ln 2
        / refresh_after per second. Capped below it, the routine falls
        behind: responses are re-signed later than BR 4.9.9 asks, and
        finally past their nextUpdate."""
        rate = self.config.refresh.routine_rate
        period = self.config.response.refresh_after.total_seconds()
        needed = population * 2 * math.log(2) / period
        if rate and rate < needed:
            log("routine_rate_low", routine_rate=rate, needed=float(f"{needed:.3g}"), entries=population,
                refresh_after=period, message="refresh.routine_rate is below the mean rate routine re-signing of "
                                              "these entries needs: responses will be re-signed late, then expire")

    def _reschedule_if_changed(self) -> None:
        """Recompute every refresh_at when refresh_after differs from the
        one they were computed with (one pass over the journal)."""
        period = self.config.response.refresh_after
        if self.journal.setting("refresh_after") == str(period.total_seconds()):
            return
        if self.journal.setting("refresh_after") is not None:
            self.journal.unschedule_all()
        after: tuple[str, int] = ("", 0)
        while page := self.journal.unscheduled(after, SCHEDULE_PAGE):
            self.journal.schedule([(r.issuer, r.serial, refresh_at(r.this_update, r.next_update, r.serial, period,
                                                                   r.not_after)) for r in page if r.not_after])
            after = (page[-1].issuer, page[-1].serial)
        self.journal.set_setting("refresh_after", str(period.total_seconds()))

    def tick(self) -> Summary:
        """Ledger changes (new ones, and pending ones whose backoff passed) first, then routine refreshes."""
        summary = Summary(started=utc_now())
        planner = make_planner(self.config, self.issuers, self.journal)
        now = time.monotonic()
        # a newer state of a serial (from a tail) replaces its pending one
        changes: dict[Key, tuple[LedgerEntry, float | None]] = {
            key: (p.entry, None) for key, p in self.pending.items() if p.retry_at <= now}
        unknown: set[Key] = set()  # serials a row in error names, or whose row is gone: not published at all
        for tail in self.tails:
            try:
                for entry in checked_entries(self.reading, self.issuers,
                                             forgetting_unknown(self._changes(tail), self.journal, self.reading,
                                                                self.pending), summary, unknown):
                    changes[(entry.issuer, entry.serial)] = (entry, self._seen_at)
            except ChangeLogError as e:  # changes may have gone unlogged: this source is read whole
                self._reread(tail, e, changes, summary)
            except LedgerError as e:  # the source is unusable now; the tail retries next tick
                summary.failures.append(Failure("ledger", e.message, source=e.source))
        if recheck := changes.keys() & self.held_back:
            self._recheck(recheck, changes, unknown, summary)
        for key in unknown:  # a pending change of such a serial is dropped, not published at its retry
            changes.pop(key, None)
            self.pending.pop(key, None)
            self.seen.pop(key, None)
        urgent: list[Planned] = []
        for key, (entry, seen_at) in changes.items():
            if planned := planner.judge(entry):
                urgent.append(planned)
                if seen_at is not None:
                    self.seen.setdefault(key, seen_at)
            elif self.pending.pop(key, None) is not None:  # the journal states it now (or it expired)
                self.seen.pop(key, None)
        planner.complete_records()  # a row put back after a deletion
        report_unrevoked(planner, summary)
        busy = self.pending.keys() | {(e.issuer, e.serial) for e, _ in urgent}
        scheduled = [(e, "refresh") for e in self._routine(summary.started) if (e.issuer, e.serial) not in busy]
        self._routine_keys = {(e.issuer, e.serial) for e, _ in scheduled}
        if scheduled:
            planner.counts["refresh"] += len(scheduled)
        self._sign(urgent + scheduled, summary, planner.counts)
        return summary

    def _recheck(self, keys: set[Key], changes: dict[Key, tuple[LedgerEntry, float | None]], unknown: set[Key],
                 summary: Summary) -> None:
        """A change to serials the last full pass held back (``held_back``:
        two sources stated them differently, or a row in error named them):
        one source's change alone does not say whether the sources agree
        now, so every source is read whole once (as ``catch_up`` does, rare:
        only when such a serial changes). Still in conflict or in error:
        added to ``unknown`` (not published), with the ledger failures
        naming them. Agreeing: the entry the sources state replaces the
        change, and the serial is no longer held back. A source unusable
        now: they all stay held back, and the next change tries again."""
        found: dict[Key, LedgerEntry] = {}
        conflicts: set[Key] = set()
        scratch = Summary(started=summary.started)
        try:
            for entry in ledger_entries(self.reading, self.issuers, scratch, conflicts):
                if (key := (entry.issuer, entry.serial)) in keys:
                    found[key] = entry
        except LedgerStop:  # its failure (the last) names the source
            conflicts = set(keys)
            summary.failures.append(scratch.failures[-1])
        summary.failures.extend(f for f in scratch.failures if f.serial and (f.issuer, int(f.serial, 16)) in keys)
        for key in keys:
            if key in conflicts:
                unknown.add(key)
                continue
            self.held_back.discard(key)
            if key in found:
                changes[key] = (found[key], changes[key][1])
            else:  # no source holds it any more: the tails reported its removal
                changes.pop(key, None)

    def _reread(self, tail: Tail, why: ChangeLogError, changes: dict[Key, tuple[LedgerEntry, float | None]],
                summary: Summary) -> None:
        """A SQLite ledger whose change log no longer continues from the
        tail's position (restored from a backup, unread change rows deleted,
        triggers dropped: ``ledger.sqlite.SqliteTail``): restart the tail,
        then judge every entry of the source, as ``catch_up`` does. A log
        still incomplete is a ledger failure, and the next tick tries again.
        When every source is ``sqlite``, the journal is then swept as after
        a full pass (``report_absent``, its guard included): a row the
        restored ledger lacks was deleted with no change logged. With other
        sources, whose keys only a full read gives, the next full pass
        (a reload, a restart) sweeps."""
        log("ledger_reread", source=tail.source.path, reason=why.message)
        try:
            tail.start()
            items = forgetting_unknown(read_source(tail.source, self.issuers), self.journal, self.reading)
            for entry in checked_entries(self.reading, self.issuers, items, summary):
                changes[(entry.issuer, entry.serial)] = (entry, None)
            if all(source.type == "sqlite" for source in self.reading.sources):
                now = utc_now()
                with LedgerKeys(now) as nothing_else:  # no key to add: every sqlite ledger is probed
                    report_absent(self.reading, self.issuers, self.journal, summary, nothing_else, now)
        except LedgerError as e:
            summary.failures.append(Failure("ledger", e.message, source=e.source))

    def _changes(self, tail: Tail) -> Iterator[LedgerEntry | LedgerError]:
        for change in tail.changes():
            self._seen_at = change.seen_at.timestamp()
            yield change.item

    def _routine(self, now: dt.datetime) -> list[LedgerEntry]:
        limit = ROUTINE_MAX
        if self.config.refresh.routine_rate:
            limit = max(1, round(self.config.refresh.routine_rate * self.config.refresh.tick.total_seconds()))
        expired: list[Key] = []
        entries = list(routine(self.journal.due_by(now, limit), self.issuers, now, expired))
        if expired:
            self.journal.retire(expired)
        return entries

    def _sign(self, planned: Iterable[Planned | None], summary: Summary, counts: Counter[str]) -> None:
        """Sign ``planned``; keep the ledger changes that failed pending
        (with their next backoff); finish ``summary`` with the planner's
        ``counts``; log each failure and count it once; update metrics."""
        runner = self._runner(summary)
        self.published, self._failed = set(), {}
        try:
            sign_all(self.pool, runner, planned, None, 0.0, self.stopping)
            self.journal.check_clock(utc_now())
        except ClockError as e:
            log("clock", error=str(e))
            summary.failures.append(Failure("clock", str(e)))
        now = time.monotonic()
        for key, entry in self._failed.items():
            if key not in self.published:
                failures = p.failures + 1 if (p := self.pending.get(key)) else 1
                self.pending[key] = Pending(entry, failures, now + retry_delay(failures))
        for f in summary.failures:
            self.metrics.failed.labels(f.stage).inc()
            retry: dict[str, object] = {}
            if f.serial and (key := (f.issuer, int(f.serial, 16))) in self._failed and (p := self.pending.get(key)):
                retry = {"attempt": p.failures, "retry_in": retry_delay(p.failures)}
            log("failure", stage=f.stage, issuer=f.issuer, serial=f.serial, source=f.source, message=f.message, **retry)
        self.metrics.changes_pending.set(len(self.pending))
        for issuer in self.issuers:
            if (oldest := self.journal.oldest(issuer)) is not None:
                self.metrics.oldest.labels(issuer).set(oldest.timestamp())
        if now >= self._earliest_at:  # the catch-up pass's, then once every EARLIEST_EVERY
            self._earliest_at = now + EARLIEST_EVERY
            for issuer in self.issuers:
                if (earliest := self.journal.earliest_next_update(issuer)) is not None:
                    self.metrics.earliest.labels(issuer).set(earliest.timestamp())
        summary.finish(runner.counted(counts))
        for why, n in summary.due.items():
            self.metrics.due.labels(why).inc(n)


class Service:
    """The signal-driven loop around Sessions; ``serve()`` returns the exit status."""

    def __init__(self, config_path: str) -> None:
        self.path = config_path
        self.wake = threading.Event()
        self.stop = False
        self.reload = False

    def _on_term(self, signum: int, frame: object) -> None:
        self.stop = True
        self.wake.set()

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload = True
        self.wake.set()

    def _session(self, config: Config, metrics: RefreshMetrics) -> Session:
        """A Session for ``config``, entered (pool started, keys probed, tails started)."""
        return Session(config, metrics, lambda: self.stop).__enter__()

    def serve(self) -> int:
        config = load_config(self.path)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        metrics = RefreshMetrics(config.refresh.metrics_listen)
        try:
            session = self._session(config, metrics)
        except SignerError as e:
            log("signer_failed", error=str(e))
            print(f"ocspmint refresh: {e}", file=sys.stderr)
            return 1
        except LedgerError as e:  # a source unusable at start: nothing to tail from
            log("ledger_failed", error=str(e))
            print(f"ocspmint refresh: {e}", file=sys.stderr)
            return 1
        try:
            fresh = True
            while not self.stop:
                if fresh:
                    first = session.catch_up()
                    log("caught_up", published=first.published, due=first.due, failures=len(first.failures),
                        pending=len(session.pending), seconds=first.seconds)
                    fresh = False
                self._loop(session)
                if self.reload and not self.stop:
                    self.reload = False
                    if (new := self._reloaded(session, metrics)) is not None:
                        session.close()
                        new.adopt(session)
                        session, fresh = new, True
        finally:
            session.close()
        log("stopped")
        return 0

    def _reloaded(self, old: Session, metrics: RefreshMetrics) -> Session | None:
        """A Session built and probed from the config file as it is now
        (``old`` stays open meanwhile); None (``reload_failed`` logged)
        when anything about it fails: ``old`` goes on serving."""
        try:
            config = load_config(self.path)
            before, after = Path(old.config.state_dir).resolve(), Path(config.state_dir).resolve()
            if after != before:  # the CLI locked ``before`` for this process (statelock), not ``after``
                log("reload_failed", error=f"state_dir changed from {before} to {after}: the running service keeps "
                                          "its state folder (journal, lock); restart it to move to another")
                return None
            new = self._session(config, metrics)
        except Exception as e:  # whatever it is, the running Session is better than none
            log("reload_failed", error=describe(e))
            return None
        log("reloaded", config=self.path)
        return new

    def _loop(self, session: Session) -> None:
        period = session.config.refresh.tick.total_seconds()
        while not self.stop and not self.reload:
            started = time.monotonic()
            summary = session.tick()
            if summary.published or summary.failures:
                log("tick", published=summary.published, due=summary.due, failures=len(summary.failures),
                    pending=len(session.pending), seconds=summary.seconds)
            self.wake.wait(max(0.0, period - (time.monotonic() - started)))
            self.wake.clear()


def refresh_service(config_path: str) -> int:
    """Run until SIGTERM; raises ConfigError/IdentityError/UriError at start."""
    return Service(config_path).serve()
