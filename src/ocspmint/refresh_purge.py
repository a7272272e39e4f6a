"""The refresh service's CDN purges: one ``Purger`` thread per
``[[purge]]`` target sends what the journal holds queued (``invalidate``),
so a slow or dead target never delays signing or another target; and the
helpers the service shares with it (``log``, ``retry_delay``,
``describe``). docs/refresh.md."""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time

import msgspec

from ocspmint.config import Config, ConfigError, Purge
from ocspmint.invalidator import invalidate
from ocspmint.issuer import IdentityError, IssuerIdentity
from ocspmint.journal import Journal
from ocspmint.metrics import RefreshMetrics
from ocspmint.model import LedgerError
from ocspmint.pkcs11uri import UriError
from ocspmint.report import PurgeResult
from ocspmint.signer import SignerError
from ocspmint.store import StoreError

RETRY_FIRST = 1.0  # seconds before the first retry of a ledger change (or purge target) that failed
RETRY_MAX = 60.0  # seconds between retries of one that keeps failing
PURGE_LOG_EVERY = 60.0  # seconds between two ``purge_pending`` lines of one target
PURGE_JOIN = 2.0  # seconds a closing Session waits for a purge in progress (it stays queued if cut off)

Key = tuple[str, int]  # (issuer, serial)
_log_lock = threading.Lock()


def log(event: str, **fields: object) -> None:
    """One JSON line on stderr (structured log), whole even when threads log
    at once: ``time`` (RFC 3339 UTC with microseconds and ``Z``, as `serve`
    writes it), ``event``, then ``fields``."""
    now = dt.datetime.now(dt.timezone.utc)
    line = json.dumps({"time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "event": event, **fields}, default=str) + "\n"
    with _log_lock:
        sys.stderr.write(line)
        sys.stderr.flush()


def retry_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` (≥ 1) consecutive failures: RETRY_FIRST doubling to RETRY_MAX."""
    return min(RETRY_MAX, RETRY_FIRST * 2 ** min(failures - 1, 16))


def describe(e: BaseException) -> str:
    """An exception as a log field: our own errors by their message, others with their type."""
    known = (ConfigError, IdentityError, UriError, SignerError, LedgerError, StoreError)
    return str(e) if isinstance(e, known) else f"{type(e).__name__}: {e}"


class _PurgeQueue:
    """The journal as ``invalidate`` sees it from a Purger thread.
    ``purged`` leaves queued any purge the signing thread queued again
    while the pass ran (``Purger.queued``): its new response may have been
    stored after the purge went out, so it must be sent again. A closed
    Purger (its Session replaced or stopped) removes nothing: it no longer
    hears of what is queued again, and the next Purger sends it again."""

    def __init__(self, journal: Journal, purger: Purger) -> None:
        self._journal, self._purger = journal, purger

    def __getattr__(self, name: str) -> object:
        return getattr(self._journal, name)

    def purged(self, target: str, done: list[Key]) -> None:
        with self._purger.lock:
            if not self._purger.closed:
                again = self._purger.window or set()
                self._journal.purged(target, [k for k in done if k not in again])


class Purger:
    """Sends one target's queued purges (``invalidate``) on a thread of its
    own, with its own journal connection: a slow or dead target never
    delays signing, and never delays another target. Runs at start, when
    poked (purges were just queued) and every tick; after a failed attempt
    it waits ``retry_delay`` (1 s doubling to 60 s), pokes or not. Sets
    ``ocspmint_purges_pending{target}`` after every attempt and logs
    ``purge_pending`` (at most once per ``PURGE_LOG_EVERY``) while purges
    stay queued, ``purge_recovered`` once they went out. What fails stays
    queued in the journal, as with `ocspmint run`."""

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], target: Purge,
                 metrics: RefreshMetrics) -> None:
        self.config = msgspec.structs.replace(config, purge=[target])
        self.issuers, self.target, self.metrics = issuers, target, metrics
        self.lock = threading.Lock()
        self.window: set[Key] | None = None  # keys queued again during a pass (None: no pass running)
        self.closed = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"purge-{target.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def queued(self, keys: list[Key]) -> None:
        """The signing thread is about to queue purges of ``keys``."""
        with self.lock:
            if self.window is not None:
                self.window.update(keys)

    def close(self) -> None:
        """Stop; a purge still being sent after PURGE_JOIN is left to finish
        on its own (daemon thread): it stays queued, and is sent again."""
        with self.lock:
            self.closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(PURGE_JOIN)

    def _run(self) -> None:
        name, period = self.target.name, self.config.refresh.tick.total_seconds()
        failures, logged, reported = 0, -PURGE_LOG_EVERY, False
        journal: Journal | None = None
        try:
            while not self._stop.is_set():
                self._wake.clear()  # a poke from now on runs another pass
                with self.lock:
                    self.window = set()
                pending: int | None = None
                try:
                    if journal is None:
                        journal = Journal(self.config.state_dir)
                    queued = journal.queued_purges(name)
                    orphans = sum(1 for issuer, _ in queued if issuer not in self.issuers)
                    result = invalidate(self.config, self.issuers, _PurgeQueue(journal, self))[name] \
                        if queued else PurgeResult()
                    pending, failed, error = result.pending, result.pending > orphans, result.error
                except Exception as e:  # a journal or client error: retried like a failed send
                    result, failed, error = PurgeResult(), True, f"{name}: {describe(e)}"
                finally:
                    with self.lock:
                        self.window = None
                if self._stop.is_set():  # closed meanwhile: the target's gauge and log belong to the next Purger
                    break
                if pending is not None:
                    self.metrics.purges_pending.labels(name).set(pending)
                failures = failures + 1 if failed else 0
                now = time.monotonic()
                if pending or failed:  # still queued: orphans (issuers no longer configured) or a failed send
                    if now - logged >= PURGE_LOG_EVERY:
                        log("purge_pending", target=name, pending=pending, sent=result.sent, attempts=failures,
                            error=error)
                        logged, reported = now, True
                elif reported:
                    log("purge_recovered", target=name, sent=result.sent)
                    logged, reported = -PURGE_LOG_EVERY, False
                if failures:
                    self._stop.wait(retry_delay(failures))  # pokes do not shorten a backoff
                else:
                    self._wake.wait(period)
        finally:
            if journal is not None:
                journal.close()
