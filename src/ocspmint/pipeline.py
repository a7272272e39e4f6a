"""`ocspmint run`: ledger → planner → signer pool → verifier → store →
journal → invalidator (purge queue) → served check (verify_served).

``run(config)`` returns a Summary; ``summary.ok`` is False when anything
due was not published and verified (the CLI then exits 1). Nothing is
journaled before the store acknowledged it, and nothing is stored that
failed verification (docs/ocsp-rules.md).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

from ocspmint.config import Config
from ocspmint.incremental import LedgerMark
from ocspmint.invalidator import invalidate
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.journal import ClockError, Journal
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, LedgerError, serial_hex, utc_now
from ocspmint.planner import Force, Planner, Spool
from ocspmint.report import Failure, Progress, Summary
from ocspmint.runner import Planned, Runner, probe_keys, sign_all
from ocspmint.served import Sample, check_served
from ocspmint.signer import PoolStart, SignerError, signer_pool
from ocspmint.store import open_store

Select = Callable[[LedgerEntry], bool]
__all__ = ["Force", "LedgerStop", "Planned", "checked_entries", "ledger_entries", "make_planner", "run"]


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


def _statement(e: LedgerEntry) -> tuple[object, ...]:
    return e.status, e.revoked_at, e.reason


def ledger_entries(config: Config, issuers: dict[str, IssuerIdentity], summary: Summary,
                   conflicts: set[tuple[str, int]] | None = None) -> Iterator[LedgerEntry]:
    """Every good entry of every source (see ``checked_entries``), each
    (issuer, serial) once: with several sources, a serial they state alike
    comes once, and one they state differently (one says revoked, the
    other good) is a ledger failure added to ``conflicts``, whose entries
    the caller must not publish. Memory: one key per entry when there is
    more than one source. An unusable source raises LedgerStop."""
    seen: dict[tuple[str, int], LedgerEntry] | None = {} if len(config.sources) > 1 else None
    for source in config.sources:
        try:
            for entry in checked_entries(config, issuers, read_source(source, issuers), summary, conflicts):
                if seen is None:
                    yield entry
                    continue
                key = (entry.issuer, entry.serial)
                first = seen.setdefault(key, entry)
                if first is entry:
                    yield entry
                elif _statement(first) != _statement(entry):
                    summary.failures.append(Failure(
                        "ledger", f"serial stated differently: {first.status.value} by {first.source}, "
                                  f"{entry.status.value} by {entry.source}; neither is published",
                        entry.issuer, serial_hex(entry.serial), entry.source))
                    if conflicts is not None:
                        conflicts.add(key)
                    if config.on_error == "stop":
                        raise LedgerStop(f"{entry.source}: serial {entry.serial:#x} stated differently by two sources")
        except LedgerError as e:
            summary.failures.append(Failure("ledger", e.message, source=e.source))
            raise LedgerStop(str(e)) from None


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
    ``incremental``). Raises IdentityError/UriError for unusable issuer or
    signer settings.
    """
    summary = Summary(started=dt.datetime.now(dt.timezone.utc))
    issuers = load_issuers(config)
    signers = PoolStart(signer_pool(config, issuers))
    with Journal(config.state_dir) as journal, Spool(config.state_dir) as spool, signers:
        planner = make_planner(config, issuers, journal, force)
        mark = LedgerMark(config, issuers, journal)
        try:
            journal.check_clock(planner.now)
            conflicts = _plan(config, issuers, planner, summary, spool, select, mark, incremental, signers.start)
        except LedgerStop:
            summary.finish(planner.counts)
            return summary
        except ClockError as e:
            summary.failures.append(Failure("clock", str(e)))
            summary.finish(planner.counts)
            return summary
        store = open_store(config.store.url, config.store)
        runner = Runner(config, issuers, journal, store, summary)
        runner.force = force
        if config.verify_served.url:
            runner.sample = Sample(config.verify_served.sample)
        try:
            if len(spool):
                progress = Progress(len(spool), "signing") if show_progress else None
                due = spool.entries(conflicts)  # conflicts are known only after the whole pass
                try:
                    pool = signers.pool()
                    summary.signer_backend = pool.backends
                    probe_keys(pool, runner)
                    sign_all(pool, runner, due, progress, rate)
                except SignerError as e:  # the pool could not start
                    runner.fail_all([entry for entry, _ in due], "sign", str(e))
        finally:
            signers.close()
            runner.settle(0)
            store.close()
        summary.purges = invalidate(config, issuers, journal)
        if config.verify_served.url:
            summary.served_checked, failures = check_served(config, issuers, journal, runner.sample)
            summary.failures.extend(failures)
        summary.finish(planner.counts)
        if summary.ok and select is None and force is None:
            mark.save()
        if summary.published:
            journal.add_run(summary.started, summary.seconds, summary.published)
    return summary


def _plan(config: Config, issuers: dict[str, IssuerIdentity], planner: Planner, summary: Summary, spool: Spool,
          select: Select | None, mark: LedgerMark, incremental: bool,
          full_pass: Callable[[], None]) -> set[tuple[str, int]]:
    """Put what is due in ``spool``: from a full ledger pass, or, when
    ``incremental`` and the journal's mark allows it, from the ledger
    changes since the mark plus the journal's routine re-signing (module
    ``incremental``). Returns the keys found in conflict (not to publish).
    Sets ``summary.plan``. Raises LedgerStop. ``full_pass`` is called as
    a full pass begins: the caller starts its signers then, so that they
    log in while the ledger is read (an incremental plan may find nothing
    due, and then needs no signer)."""
    conflicts: set[tuple[str, int]] = set()
    why_full = mark.why_full() if incremental else None
    if incremental and why_full is None:
        summary.plan = "incremental"
        changed = set()
        try:
            for entry, why in planner.due(checked_entries(config, issuers, mark.changes(), summary, conflicts)):
                changed.add((entry.issuer, entry.serial))
                spool.add((entry, why))
        except LedgerError as e:  # the database as a whole is unusable
            summary.failures.append(Failure("ledger", e.message, source=e.source))
            raise LedgerStop(str(e)) from None
        for entry in mark.routine(issuers, planner.now, changed):
            planner.counts["refresh"] += 1
            spool.add((entry, "refresh"))
        return conflicts
    summary.plan = f"full ({why_full})" if why_full else "full"
    full_pass()
    mark.start()
    entries = ledger_entries(config, issuers, summary, conflicts)
    for planned in planner.due(e for e in entries if select is None or select(e)):
        spool.add(planned)
    planner.complete_records()
    return conflicts

