"""`ocspmint reissue`: re-sign and re-publish a selected population now.

The incident tool: a responder key to replace, a batch of keyCompromise
revocations, a list of serials whose responses are wrong. Every selected,
unexpired entry is re-signed (planner reason ``forced``, journaled with
``why = "reissue <job>: <reason>"``), verified, published and — unless
``--no-purge`` — purged from every configured CDN target at once; the run
ends with an audit of the selection (docs/reissue.md).

Resumable: the job (reason + canonical selection) is recorded in the
journal's ``jobs`` table; running the same command again after any
interruption resumes it, re-signing only what was not re-signed since the
job started. ``rate`` caps responses/s so issuance keeps HSM capacity.

``--clock-was-fast`` (``recover_clock``): the recovery from a clock that
ran fast and was corrected. Every command refuses to sign while the clock
reads earlier than the latest time the journal recorded (``ClockError``:
it protects against a clock going backwards), and the responses signed
while it ran fast carry a thisUpdate and producedAt in the future, which
relying parties reject, and look fresh to the planner. With the operator's
confirmation that the clock is right now (the option, and ``--reason``),
it accepts the current clock (``Journal.accept_clock``: logged in the
journal's ``clock_resets`` with the reason) and re-signs, publishes,
purges and audits every unexpired response the journal shows dated in the
future, as reissue job ``CLOCK_JOB``; resumable like any job
(docs/faults.md).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import Counter
from collections.abc import Callable

import msgspec

from ocspmint.config import Config
from ocspmint.issuer import load_issuers
from ocspmint.journal import CLOCK_SLACK, Job, Journal, Record
from ocspmint.model import LedgerEntry, utc_now
from ocspmint.pipeline import LedgerStop, ledger_entries, make_planner, run
from ocspmint.planner import Force
from ocspmint.report import Failure, Summary
from ocspmint.selection import Selection, Selector

CLOCK_JOB = '{"clock_was_fast":true}'  # the jobs.selector of `reissue --clock-was-fast`


class ClockRecovery(msgspec.Struct):
    """`reissue --clock-was-fast`: ``now`` the clock taken as right;
    ``recorded`` the latest time the journal had recorded before (None:
    none); ``accepted`` whether this command replaced it by ``now`` (False:
    the clock was not behind it, or a dry run); ``future_dated`` the journal
    records dated after ``now``, ``expired`` those of them whose certificate
    expired (not re-signed); ``left`` unexpired ones still dated in the
    future after the re-signing (0 when done)."""

    now: dt.datetime
    recorded: dt.datetime | None
    accepted: bool
    future_dated: int
    expired: int = 0
    left: int = 0

    @property
    def behind(self) -> bool:
        return self.recorded is not None and self.recorded > self.now + CLOCK_SLACK

    def text(self, dry: bool = False) -> str:
        if self.behind:
            ahead = dt.timedelta(seconds=round((self.recorded - self.now).total_seconds()))
            verb = "would accept" if dry else ("accepted" if self.accepted else "did not accept")
            clock = (f"the clock reads {self.now:%Y-%m-%dT%H:%M:%SZ}, {ahead} behind {self.recorded:%Y-%m-%dT%H:%M:%SZ} "
                     f"recorded in the journal: {verb} as right")
        elif self.accepted:
            clock = f"accepted the clock {self.now:%Y-%m-%dT%H:%M:%SZ} as right"
        else:
            clock = f"the clock ({self.now:%Y-%m-%dT%H:%M:%SZ}) is not behind the journal's latest time"
        live = self.future_dated - self.expired
        dated = (f"{self.future_dated} responses dated in the future ({live} to re-sign, "
                 f"{self.expired} of expired certificates left as they are)")
        left = f"; {self.left} still dated in the future" if self.left else ""
        return f"clock: {clock}; {dated}{left}"


class DryRun(msgspec.Struct):
    """What a reissue would do: ``due`` by planner reason among the
    ``selected`` entries, and the estimate at ``rate`` responses/s (the
    journal's measured rate, capped by --rate; None before any run).
    ``ledger_failures``: ledger rows in error, or a source unusable (the
    counts then miss what it holds: the dry run is not ``ok``)."""

    selected: int
    due: dict[str, int]
    expired: int
    rate: float | None
    seconds: float | None
    resumes_job: int | None
    ledger_failures: list[Failure] = []
    clock: ClockRecovery | None = None

    @property
    def ok(self) -> bool:
        return not self.ledger_failures

    def text(self) -> str:
        n = sum(self.due.values())
        est = "no measured rate yet (run once first)" if self.seconds is None else \
            f"about {dt.timedelta(seconds=round(self.seconds))} at {self.rate:.0f} responses/s"
        job = f"; resumes unfinished job {self.resumes_job}" if self.resumes_job else ""
        bad = "".join(f"\n  ledger: {f.source}: {f.message}" for f in self.ledger_failures)
        incomplete = f"\nINCOMPLETE: {len(self.ledger_failures)} ledger failure(s), counts miss them:{bad}" if bad else ""
        clock = f"\n{self.clock.text(dry=True)}; nothing was changed" if self.clock is not None else ""
        return (f"dry run: {self.selected} entries selected, {self.expired} expired (skipped); would re-sign, publish "
                f"and verify {n} {dict(sorted(self.due.items()))}: {est}{job}. Nothing was signed.{incomplete}{clock}")


class Outcome(msgspec.Struct):
    job: int
    reason: str
    resumed: bool
    selection: Selection
    summary: Summary
    audit: dict = {}
    ok: bool = False
    clock: ClockRecovery | None = None


def job_force(job: int, reason: str, since: dt.datetime, purge: bool) -> Force:
    """The Force of reissue job ``job``: its ``why`` tags every response it signs."""
    return Force(f"reissue {job}: {reason}", since, purge)


def dry_run(config: Config, sel: Selection, reason: str, rate: float) -> DryRun:
    """Plan the reissue without signing; ledger failures (a bad row, an
    unusable source) are kept in the result. Raises SelectionError."""
    selector = Selector(sel)
    issuers = load_issuers(config)
    selector.check_issuers(issuers)
    summary = Summary(started=utc_now())
    with Journal(config.state_dir) as journal:
        pending = journal.unfinished_job(sel.key())
        force = Force("dry run", utc_now()) if pending is None else job_force(pending.id, pending.reason, pending.since, True)
        planner = make_planner(config, issuers, journal, force)
        due = 0
        try:
            due = sum(1 for _ in planner.due(e for e in ledger_entries(config, issuers, summary) if selector.matches(e)))
        except LedgerStop:  # the failure is in summary.failures
            pass
        measured = journal.measured_rate()
    summary.failures += [Failure("ledger", message) for message in selector.unlisted()]
    speed = min(filter(None, [measured, rate or None]), default=None)
    counts = planner.counts
    return DryRun(sum(counts.values()), {k: v for k, v in counts.items() if k not in ("expired", "up_to_date")},
                  counts.get("expired", 0), speed, None if speed is None else due / speed,
                  None if pending is None else pending.id, summary.failures)


def reissue(config: Config, sel: Selection, reason: str, rate: float, purge: bool, show_progress: bool) -> Outcome:
    """Run (or resume) the reissue job; ``ok`` when everything selected
    was re-signed, published, purged and the audit of the selection is
    clean. Raises SelectionError for an unusable selection."""
    selector = Selector(sel)
    selector.check_issuers(load_issuers(config))
    with Journal(config.state_dir) as journal:
        job = journal.job(reason, sel.key(), utc_now())
    force = job_force(job.id, job.reason, job.since, purge)
    summary = run(config, show_progress, select=selector.matches, force=force, rate=rate)
    problems = selector.unlisted() + ([_no_not_before(selector.no_not_before)] if selector.no_not_before else [])
    if problems:
        summary.failures += [Failure("ledger", message) for message in problems]
        summary.ok = False
    return _finish(config, job, Outcome(job.id, reason, job.resumed, sel, summary), selector.matches)


def _finish(config: Config, job: Job, outcome: Outcome, select: Callable[[LedgerEntry], bool]) -> Outcome:
    """Audit the job's selection; ``ok`` and the job finished in the journal
    when the run was ok and the audit found nothing."""
    outcome.audit = audit_selection_of(config, select)
    outcome.ok = outcome.summary.ok and not outcome.audit.get("findings")
    if outcome.ok:
        with Journal(config.state_dir) as journal:
            journal.finish_job(job, outcome.summary.published, utc_now())
    return outcome


def _no_not_before(n: int) -> str:
    return (f"{n} entries have no notBefore in the ledger, so the issued time range could not select them "
            "(re-ingest the ledger to record notBefore)")


def _live(records: list[Record], now: dt.datetime) -> list[Record]:
    """The records whose certificate has not expired (no notAfter known: kept; the ledger decides)."""
    return [r for r in records if r.not_after is None or r.not_after > now]


def clock_dry_run(config: Config, rate: float) -> DryRun:
    """What ``recover_clock`` would do, from the journal alone; changes nothing."""
    now = utc_now()
    with Journal(config.state_dir) as journal:
        recorded = journal.latest_clock()
        future = journal.future_dated(now)
        pending = journal.unfinished_job(CLOCK_JOB)
        measured = journal.measured_rate()
    live = len(_live(future, now))
    speed = min(filter(None, [measured, rate or None]), default=None)
    return DryRun(len(future), {"forced": live} if live else {}, len(future) - live, speed,
                  None if speed is None else live / speed, None if pending is None else pending.id,
                  clock=ClockRecovery(now, recorded, False, len(future), len(future) - live))


def recover_clock(config: Config, reason: str, rate: float, purge: bool, show_progress: bool) -> Outcome:
    """`reissue --clock-was-fast`: accept the current clock (the operator
    confirmed it is right) and re-sign every unexpired response the journal
    shows dated after it (module docstring). ``ok`` when none is left in
    the future, all were published and purged, and the audit of them is
    clean; run again to resume otherwise. Job 0 and nothing done when the
    clock is not behind the journal and no response is dated in the future."""
    now = utc_now()
    with Journal(config.state_dir) as journal:
        recorded = journal.latest_clock()
        future = journal.future_dated(now)
        live = _live(future, now)
        clock = ClockRecovery(now, recorded, False, len(future), len(future) - len(live))
        pending = journal.unfinished_job(CLOCK_JOB)
        if not clock.behind and not live and pending is None:
            summary = Summary(started=now)
            summary.finish(Counter())
            return Outcome(0, reason, False, Selection(), summary, ok=summary.ok, clock=clock)
        job = journal.job(reason, CLOCK_JOB, now)
        clock.accepted = journal.accept_clock(now, f"reissue {job.id}: {reason}") is not None
    if clock.accepted:
        print(f"ocspmint: reissue job {job.id}: {clock.text()}; logged in {journal.path} (clock_resets): {reason}",
              file=sys.stderr)
    keys: dict[str, set[int]] = {}
    for r in live:
        keys.setdefault(r.issuer, set()).add(r.serial)

    def select(e: LedgerEntry) -> bool:
        return e.serial in keys.get(e.issuer, ())

    summary = run(config, show_progress, select=select, force=job_force(job.id, job.reason, job.since, purge), rate=rate)
    with Journal(config.state_dir) as journal:
        after = utc_now()
        clock.left = len(_live(journal.future_dated(after), after))
    if clock.left:
        summary.failures.append(Failure("clock", f"{clock.left} unexpired responses are still dated after "
                                                 f"{after:%Y-%m-%dT%H:%M:%SZ} in the journal (not re-signed: see the "
                                                 "failures above, or serials no longer in the ledger)"))
        summary.ok = False
    return _finish(config, job, Outcome(job.id, reason, job.resumed, Selection(), summary, clock=clock), select)


def audit_selection_of(config: Config, select: Callable[[LedgerEntry], bool]) -> dict:
    from ocspmint.audit import audit_selection

    return audit_selection(config, select)
