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
"""

from __future__ import annotations

import datetime as dt

import msgspec

from ocspmint.config import Config
from ocspmint.issuer import load_issuers
from ocspmint.journal import Journal
from ocspmint.model import utc_now
from ocspmint.pipeline import LedgerStop, ledger_entries, make_planner, run
from ocspmint.planner import Force
from ocspmint.report import Failure, Summary
from ocspmint.selection import Selection, Selector


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
        return (f"dry run: {self.selected} entries selected, {self.expired} expired (skipped); would re-sign, publish "
                f"and verify {n} {dict(sorted(self.due.items()))}: {est}{job}. Nothing was signed.{incomplete}")


class Outcome(msgspec.Struct):
    job: int
    reason: str
    resumed: bool
    selection: Selection
    summary: Summary
    audit: dict = {}
    ok: bool = False


def job_force(job: int, reason: str, since: dt.datetime, purge: bool) -> Force:
    """The Force of reissue job ``job``: its ``why`` tags every response it signs."""
    return Force(f"reissue {job}: {reason}", since, purge)


def dry_run(config: Config, sel: Selection, reason: str, rate: float) -> DryRun:
    """Plan the reissue without signing; ledger failures (a bad row, an
    unusable source) are kept in the result. Raises SelectionError."""
    selector = Selector(sel)
    issuers = load_issuers(config)
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
    with Journal(config.state_dir) as journal:
        job = journal.job(reason, sel.key(), utc_now())
    force = job_force(job.id, job.reason, job.since, purge)
    summary = run(config, show_progress, select=selector.matches, force=force, rate=rate)
    if selector.no_not_before:
        summary.failures.append(_no_not_before(selector.no_not_before))
        summary.ok = False
    outcome = Outcome(job.id, reason, job.resumed, sel, summary)
    outcome.audit = _audit(config, selector)
    outcome.ok = summary.ok and not outcome.audit.get("findings")
    if outcome.ok:
        with Journal(config.state_dir) as journal:
            journal.finish_job(job, summary.published, utc_now())
    return outcome


def _no_not_before(n: int) -> Failure:
    return Failure("ledger", f"{n} entries have no notBefore in the ledger, so the issued time range could not "
                             "select them (re-ingest the ledger to record notBefore)")


def _audit(config: Config, selector: Selector) -> dict:
    from ocspmint.audit import audit_selection

    return audit_selection(config, selector.matches)
