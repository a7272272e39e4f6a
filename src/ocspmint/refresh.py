"""`ocspmint refresh`: the continuous service (docs/refresh.md).

Start-up (and every SIGHUP reload) opens the journal, store and signer pool
once, remembers each ledger source's position (``ledger.tail.Tail``), then
catches up with one full planner pass, like `ocspmint run`. After that,
every ``refresh.tick``:

1. ledger changes since the last tick (new precertificates and
   certificates, revocations) are planned and signed first, uncapped: the
   BR 4.9.10 / MRSP 15-minute limit becomes seconds;
2. routine re-signing takes the journal records whose ``refresh_at`` came
   (an index range scan: cost grows with what is due, not with the
   ledger), at most ``refresh.routine_rate`` per second; ``refresh_at`` is
   spread by serial over the second half of ``refresh_after``
   (``planner.refresh_at``), so a population signed at once comes due
   spread out and the HSM sees a flat load;
3. queued CDN purges are sent (``invalidator.invalidate``).

SIGTERM/SIGINT: stop dispatching, let the in-flight batches finish and be
journaled, exit 0 (what was not dispatched is simply due at the next
start). SIGHUP: reload the config at the next tick (a bad config is
logged and the old one kept). A ledger row that cannot be read is logged
and counted, never fatal: the service keeps every other response fresh.
Prometheus metrics on ``refresh.metrics_listen`` (``RefreshMetrics``).
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import threading
import time
from collections import Counter

import msgspec
from collections.abc import Callable, Iterable, Iterator

from ocspmint.config import Config, ConfigError, load_config
from ocspmint.invalidator import invalidate
from ocspmint.issuer import IdentityError, load_issuers
from ocspmint.journal import ClockError, Journal
from ocspmint.ledger.tail import Tail
from ocspmint.metrics import RefreshMetrics
from ocspmint.pkcs11uri import UriError
from ocspmint.model import LedgerEntry, LedgerError, utc_now
from ocspmint.pipeline import LedgerStop, checked_entries, ledger_entries, make_planner, report_unrevoked
from ocspmint.runner import Planned, Runner, probe_keys, sign_all
from ocspmint.planner import Spool, refresh_at, routine
from ocspmint.report import Failure, Summary
from ocspmint.signer import SignerError, key_spec, signer_pool
from ocspmint.store import open_store

ROUTINE_MAX = 50_000  # journal records taken per tick at most
SCHEDULE_PAGE = 10_000
RETRY_MAX = 60.0  # seconds between retries of ledger changes that keep failing


def log(event: str, **fields: object) -> None:
    """One JSON line on stderr (structured log)."""
    print(json.dumps({"time": utc_now().isoformat(), "event": event, **fields}, default=str), file=sys.stderr, flush=True)


class Session:
    """One loaded config: issuers, journal, store, signer pool and tails."""

    def __init__(self, config: Config, metrics: RefreshMetrics, stopping: Callable[[], bool]) -> None:
        self.config, self.metrics, self.stopping = config, metrics, stopping
        # a bad ledger row is logged and skipped whatever on_error says: the service keeps everything else fresh
        self.reading = msgspec.structs.replace(config, on_error="quarantine")
        self.issuers = load_issuers(config)
        self.journal = Journal(config.state_dir)
        self.store = open_store(config.store.url, config.store)
        self.pool = signer_pool(config, self.issuers)
        self.tails = [Tail(s, self.issuers) for s in config.sources]
        self.seen: dict[tuple[str, int], float] = {}  # planned ledger change → when the ledger recorded it (Unix time)
        self.retry: list[LedgerEntry] = []  # ledger changes planned but not published yet: planned again later
        self.backoff = 0.0  # seconds before the next retry (doubling to RETRY_MAX while they keep failing)
        self.retry_at = 0.0  # monotonic
        self._seen_at = 0.0
        self.published: set[tuple[str, int]] = set()  # keys journaled by the current ``_sign``

    def __enter__(self) -> Session:
        try:
            self.pool.__enter__()
            log("signer_started", backends=self.pool.backends, workers=self.pool.workers,
                sessions=self.config.signing.sessions)
            probe_keys(self.pool, self._runner(Summary(started=utc_now())))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()
        self.store.close()
        self.journal.close()

    def _runner(self, summary: Summary) -> Runner:
        runner = Runner(self.config, self.issuers, self.journal, self.store, summary)
        runner.observer = self
        return runner

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
            if (t := self.seen.pop((e.issuer, e.serial), None)) is not None:
                self.metrics.ledger_to_published.observe(now - t)

    def catch_up(self) -> Summary:
        """Remember every tail's position, then plan and sign the whole ledger once."""
        for tail in self.tails:
            tail.start()
        self._reschedule_if_changed()
        summary = Summary(started=utc_now())
        planner = make_planner(self.config, self.issuers, self.journal)
        with Spool(self.config.state_dir) as spool:
            try:
                for planned in planner.due(ledger_entries(self.reading, self.issuers, summary)):
                    spool.add(planned)
            except LedgerStop:  # a source is unusable: sign what was read; its Tail retries every tick
                pass
            planner.complete_records()
            report_unrevoked(planner, summary)
            spool.finish()
            self._sign(spool.entries(), summary, planner.counts)
        return summary

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
            self.journal.schedule([(r.issuer, r.serial, at) for r in page
                                   if (at := refresh_at(r.this_update, r.next_update, r.serial, period,
                                                        r.not_after)) is not None])
            after = (page[-1].issuer, page[-1].serial)
        self.journal.set_setting("refresh_after", str(period.total_seconds()))

    def tick(self) -> Summary:
        """Ledger changes first, then routine refreshes, then purges."""
        summary = Summary(started=utc_now())
        planner = make_planner(self.config, self.issuers, self.journal)
        retrying = self.retry if time.monotonic() >= self.retry_at else []
        urgent = [planned for e in retrying if (planned := planner.judge(e))]
        for tail in self.tails:
            try:
                for entry in checked_entries(self.reading, self.issuers, self._changes(tail), summary):
                    if planned := planner.judge(entry):
                        urgent.append(planned)
                        self.seen.setdefault((entry.issuer, entry.serial), self._seen_at)
            except LedgerError as e:  # the source is unusable now; the tail retries next tick
                summary.failures.append(Failure("ledger", e.message, source=e.source))
        report_unrevoked(planner, summary)
        keys = {(e.issuer, e.serial) for e, _ in urgent}
        scheduled = [(e, "refresh") for e in self._routine(summary.started) if (e.issuer, e.serial) not in keys]
        if scheduled:
            planner.counts["refresh"] += len(scheduled)
        published = self._sign(urgent + scheduled, summary, planner.counts)
        failed = [e for e, _ in urgent if (e.issuer, e.serial) not in published]
        self.retry = failed + ([] if retrying else self.retry)
        self.backoff = 0.0 if not failed else min(RETRY_MAX, max(1.0, 2 * self.backoff))
        self.retry_at = time.monotonic() + self.backoff
        return summary

    def _changes(self, tail: Tail) -> Iterator[LedgerEntry | LedgerError]:
        for change in tail.changes():
            self._seen_at = change.seen_at.timestamp()
            yield change.item

    def _routine(self, now: dt.datetime) -> list[LedgerEntry]:
        limit = ROUTINE_MAX
        if self.config.refresh.routine_rate:
            limit = max(1, round(self.config.refresh.routine_rate * self.config.refresh.tick.total_seconds()))
        expired: list[tuple[str, int]] = []
        entries = list(routine(self.journal.due_by(now, limit), self.issuers, now, expired))
        if expired:
            self.journal.retire(expired)
        return entries

    def _sign(self, planned: Iterable[Planned | None], summary: Summary, counts: Counter[str]) -> set[tuple[str, int]]:
        """Sign ``planned``, send queued purges, finish ``summary`` with the
        planner's ``counts`` and update metrics; return the keys published."""
        runner = self._runner(summary)
        self.published = set()
        try:
            sign_all(self.pool, runner, planned, None, 0.0, self.stopping)
            self.journal.check_clock(utc_now())
        except ClockError as e:
            log("clock", error=str(e))
            self.metrics.failed.labels("clock").inc()
            summary.failures.append(Failure("clock", str(e)))
        if self.config.purge:
            summary.purges = invalidate(self.config, self.issuers, self.journal)
        for f in summary.failures:
            self.metrics.failed.labels(f.stage).inc()
            log("failure", stage=f.stage, issuer=f.issuer, serial=f.serial, source=f.source, message=f.message)
        for issuer in self.issuers:
            if (oldest := self.journal.oldest(issuer)) is not None:
                self.metrics.oldest.labels(issuer).set(oldest.timestamp())
        summary.finish(counts)
        for why, n in summary.due.items():
            self.metrics.due.labels(why).inc(n)
        return self.published


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

    def serve(self) -> int:
        config = load_config(self.path)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        metrics = RefreshMetrics(config.refresh.metrics_listen)
        while not self.stop:
            try:
                session = Session(config, metrics, lambda: self.stop).__enter__()
            except SignerError as e:
                log("signer_failed", error=str(e))
                print(f"ocspmint refresh: {e}", file=sys.stderr)
                return 1
            with session:
                try:
                    first = session.catch_up()
                except LedgerError as e:  # a source unusable at start: nothing to tail from
                    log("ledger_failed", error=str(e))
                    print(f"ocspmint refresh: {e}", file=sys.stderr)
                    return 1
                log("caught_up", published=first.published, due=first.due, failures=len(first.failures),
                    seconds=first.seconds)
                self._loop(session, config)
            if self.reload:
                self.reload = False
                try:
                    new = load_config(self.path)
                    [key_spec(i) for i in load_issuers(new).values()]
                    config = new
                    log("reloaded", config=self.path)
                except (ConfigError, IdentityError, UriError) as e:
                    log("reload_failed", error=str(e))
        log("stopped")
        return 0

    def _loop(self, session: Session, config: Config) -> None:
        period = config.refresh.tick.total_seconds()
        while not self.stop and not self.reload:
            started = time.monotonic()
            summary = session.tick()
            if summary.published or summary.failures:
                log("tick", published=summary.published, due=summary.due, failures=len(summary.failures),
                    seconds=summary.seconds)
            self.wake.wait(max(0.0, period - (time.monotonic() - started)))
            self.wake.clear()


def refresh_service(config_path: str) -> int:
    """Run until SIGTERM; raises ConfigError/IdentityError/UriError at start."""
    return Service(config_path).serve()
