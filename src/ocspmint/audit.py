"""`ocspmint audit`: reconcile every assigned serial with what is served.

Each selected, unexpired ledger entry is fetched from every source (the
store, and/or OCSP GET requests to an origin or CDN) and given exactly one
class (``audit_check``); the store is walked for objects of serials the
ledger does not know (``unassigned``) or whose certificate expired
(``expired_served``). A serial a ledger error names (``LedgerError.key``: a
duplicate row, two sources stating it differently as
``pipeline.ledger_entries`` finds them) is assigned in a state the ledger
does not tell: ``ledger_error``, whatever is served. ``--fix`` re-signs every
finding of a ledger serial through the pipeline (forced, purged), deletes
objects that must not be served, and audits those serials again; it never
touches a serial in error, nor deletes an object of an unknown serial while
some ledger row in error names no serial. docs/audit.md is the guide.

Memory is flat in the ledger's size: the selected ledger is streamed
(``ledger.read_source``) into a temporary SQLite file in ``state_dir``
(``WorkDB``), which then drives the checks, answers the store walk's "is
this key assigned?" by primary-key lookup and holds every finding; ok
results are only counted, and at most ``concurrency`` checks are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

import msgspec

from ocspmint.audit_check import (CLASSES, HttpSource, Job, Source, StoreSource, Verdict, WorkDB, classify, in_error,
                                  probe)
from ocspmint.config import Config
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, LedgerError, utc_now
from ocspmint.report import Progress, Summary
from ocspmint.selection import SelectionError, read_serial_list
from ocspmint.store import StoreError, object_key, open_store

BATCH = 10_000  # ledger rows per insert
TEXT_FINDINGS = 50  # findings listed by the text output (all of them with --json)
_KEY_SERIAL = re.compile(r"[0-9a-f]{40}")


class AuditError(Exception):
    """The audit cannot start (unknown issuer, unusable ledger source or
    option); the CLI exits 2."""


class Finding(msgspec.Struct):
    issuer: str  # config name; "" for a store key naming no configured issuer
    serial: str  # 40 hex digits; "" when the key names none
    source: str  # "store" | "http"
    cls: str = msgspec.field(name="class")
    detail: str = ""


class Report(msgspec.Struct):
    """One audit pass. ``checked``: (ledger serial, source) pairs
    classified; ``probed``: expired or unknown serials checked for not
    being served; ``counts``: source → class → issuer → number."""

    sources: dict[str, str]
    checked: dict[str, int] = {}
    probed: dict[str, int] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    finding_count: int = 0
    ledger_errors: list[str] = []  # "file:line: message", the first TEXT_FINDINGS
    ledger_error_count: int = 0
    ok: bool = False


class Audit:
    """Settings of one audit. ``selected``: issuer names audited;
    ``select``: a predicate on ledger entries (reissue's selection);
    ``serials``: listed serials (``--serials``), those the ledger does not
    know are probed; the store walk runs when neither narrows the ledger."""

    def __init__(self, config: Config, issuers: dict[str, IssuerIdentity], selected: set[str], sources: list[Source],
                 select: Callable[[LedgerEntry], bool] | None = None, serials: set[int] | None = None,
                 concurrency: int = 32, show_progress: bool = True) -> None:
        self.config, self.issuers, self.selected, self.sources = config, issuers, selected, sources
        self.select, self.serials, self.concurrency, self.show_progress = select, serials, concurrency, show_progress
        self.store = next((s for s in sources if isinstance(s, StoreSource)), None)
        self.unnamed = 0  # ledger errors naming no serial (set by first_pass)

    def close(self) -> None:
        if self.store is not None:
            self.store.store.close()

    def _matches(self, e: LedgerEntry) -> bool:
        return (e.issuer in self.selected and (self.select is None or self.select(e))
                and (self.serials is None or e.serial in self.serials))

    def _load(self, db: WorkDB, report: Report) -> list[int]:
        """Stream the selected ledger into ``db``; the listed serials it
        lacks. With several sources, a serial stated again is compared with
        its first statement (``pipeline.stated_differently``), so entries
        outside the selection are kept too (not listed): a serial stated
        differently is a ledger error naming it, as in ``ocspmint run``."""
        from ocspmint.pipeline import stated_differently

        several = len(self.config.sources) > 1
        found: set[int] = set()
        batch: dict[tuple[str, int], tuple[LedgerEntry, bool]] = {}  # not yet in db
        self.unnamed = 0
        for source in self.config.sources:
            if source.issuer and source.issuer not in self.selected:
                continue
            try:
                for item in read_source(source, self.issuers):
                    if isinstance(item, LedgerEntry) and item.issuer not in self.issuers:
                        item = LedgerError(item.source, f"issuer {item.issuer!r} is not configured",
                                           (item.issuer, item.serial))  # hides no serial of a configured issuer
                    if isinstance(item, LedgerEntry):
                        if item.issuer not in self.selected:
                            continue
                        key = (item.issuer, item.serial)
                        if several:
                            first = batch[key][0] if key in batch else db.first(*key)
                            if first is not None:
                                if (differs := stated_differently(first, item)) is None:
                                    continue  # stated alike: once
                                item = differs
                    if isinstance(item, LedgerError):
                        self._ledger_error(db, report, item)
                        continue
                    listed = self._matches(item)
                    if listed or several:
                        batch.setdefault(key, (item, listed))
                        if listed and self.serials is not None:
                            found.add(item.serial)
                        if len(batch) >= BATCH:
                            db.add_entries(batch.values(), several)
                            batch.clear()
            except LedgerError as e:
                raise AuditError(f"ledger source unusable: {e}") from None
        db.add_entries(batch.values(), several)
        db.db.commit()
        return sorted(self.serials - found) if self.serials is not None else []

    def _ledger_error(self, db: WorkDB, report: Report, error: LedgerError) -> None:
        """Report a ledger row in error; record the serial it names, if any
        (``error.key``): that serial is assigned, in a state unknown."""
        report.ledger_error_count += 1
        if len(report.ledger_errors) < TEXT_FINDINGS:
            report.ledger_errors.append(str(error))
        if error.key is None:
            self.unnamed += 1
        elif error.key[0] in self.selected:
            db.add_error(error.key[0], error.key[1], str(error))

    def _unnamed_note(self) -> str:
        """The detail's end for a serial the ledger does not know."""
        if not self.unnamed:
            return ""
        return (f"the ledger has {self.unnamed} rows in error that name no serial: it may be one of them "
                "(--fix does not delete it)")

    def first_pass(self, db: WorkDB) -> Report:
        """Audit the selection; findings go to ``db`` as pass 1."""
        report = self._report()
        unlisted = self._load(db, report)
        now = utc_now()
        walk = self.store is not None and self.select is None and self.serials is None
        # expired entries are probed in each source, except in a store that is walked anyway
        expired_in = tuple(s for s in self.sources if not (walk and s is self.store))
        every = tuple(self.sources)
        idents = [self.issuers[n] for n in sorted(self.selected)]

        note = self._unnamed_note()

        def in_error() -> Iterator[tuple[str, int, str]]:
            """The serials ledger errors name, in the selection."""
            for issuer, serial, error, has_entry in db.errors():
                if (self.serials is None or serial in self.serials) and (self.select is None or has_entry):
                    yield issuer, serial, error

        def jobs() -> Iterator[Job]:
            for e in db.entries():
                ident = self.issuers[e.issuer]
                expired = e.not_after <= now
                if not expired or expired_in:
                    yield Job("expired" if expired else "assigned", e.issuer, ident, e.serial,
                              object_key(ident.id, e.serial), e, expired_in if expired else every)
            for issuer, serial, error in in_error():
                ident = self.issuers[issuer]
                yield Job("ledger_error", issuer, ident, serial, object_key(ident.id, serial), None, every, error)
            for serial in unlisted:
                for ident in idents:
                    if db.error(ident.name, serial) is None:  # else a ledger_error job above
                        yield Job("unlisted", ident.name, ident, serial, object_key(ident.id, serial), None, every,
                                  note)
            if walk:
                yield from self._walk(db, now, note)

        total = ((db.count() if expired_in else db.count(now)) + sum(1 for _ in in_error())
                 + len(unlisted) * len(idents))
        self._run(1, jobs(), total, db, report, now)
        return report

    def _walk(self, db: WorkDB, now: dt.datetime, note: str) -> Iterator[Job]:
        """Store keys the ledger does not know, or of expired entries (not
        of serials in error: those have jobs of their own)."""
        assert self.store is not None
        by_id = {i.id: i for i in self.issuers.values()}
        narrowed = len(self.selected) < len(self.issuers)
        only = (self.store,)
        for key in self.store.store.keys():
            _, _, rest = key.partition("/")
            issuer_id, _, tail = rest.partition("/")
            ident = by_id.get(issuer_id)
            if (ident is None and narrowed) or (ident is not None and ident.name not in self.selected):
                continue  # --issuer: only that issuer's keys
            serial = int(tail, 16) if _KEY_SERIAL.fullmatch(tail) else None
            if ident is None or serial is None or object_key(issuer_id, serial) != key:
                yield Job("stray", "", None, None, key, None, only)
                continue
            if db.error(ident.name, serial) is not None:
                continue
            entry = db.entry(ident.name, serial)
            if entry is None or entry.not_after <= now:
                yield Job("stray" if entry is None else "expired", ident.name, ident, serial, key, entry, only,
                          note if entry is None else "")

    def recheck(self, db: WorkDB) -> Report:
        """Audit again every serial and key with a pass-1 finding (pass 2)."""
        report = self._report()
        now = utc_now()
        note = self._unnamed_note()

        def jobs() -> Iterator[Job]:
            for issuer, serial_text, key in db.targets(1):
                ident = self.issuers.get(issuer)
                if ident is None or not serial_text:
                    if self.store is not None:
                        yield Job("stray", "", None, None, key, None, (self.store,))
                    continue
                serial = int(serial_text, 16)
                if (error := db.error(issuer, serial)) is not None:
                    yield Job("ledger_error", issuer, ident, serial, key, None, tuple(self.sources), error)
                    continue
                entry = db.entry(issuer, serial)
                kind = "unlisted" if entry is None else "expired" if entry.not_after <= now else "assigned"
                yield Job(kind, issuer, ident, serial, key, entry, tuple(self.sources), note if entry is None else "")

        self._run(2, jobs(), db.target_count(1), db, report, now)
        return report

    def _report(self) -> Report:
        return Report({s.name: s.url for s in self.sources})

    def _run(self, pass_: int, jobs: Iterable[Job], total: int, db: WorkDB, report: Report, now: dt.datetime) -> None:
        progress = Progress(total, "audit") if self.show_progress else None
        try:
            asyncio.run(self._check_all(pass_, jobs, db, report, now, progress))
        except ExceptionGroup as group:  # the TaskGroup wraps what failed (a store listing: StoreError)
            raise group.exceptions[0] from None
        finally:
            if progress:
                progress.close()
        db.db.commit()
        report.ok = not report.finding_count and not report.ledger_error_count

    async def _check_all(self, pass_: int, jobs: Iterable[Job], db: WorkDB, report: Report, now: dt.datetime,
                         progress: Progress | None) -> None:
        """At most ``concurrency`` jobs in flight; each result recorded."""
        queue: asyncio.Queue[Job | None] = asyncio.Queue(self.concurrency)
        settings = self.config.response
        done = 0

        async def worker() -> None:
            nonlocal done
            while (job := await queue.get()) is not None:
                for source in job.sources:
                    got = await source.fetch(job.key, job.ident, job.serial)
                    if job.kind == "assigned":
                        assert job.ident is not None and job.entry is not None
                        v = classify(got, job.ident, job.entry, settings, now)
                    elif job.kind == "ledger_error":
                        v = in_error(got, job.note)
                    else:
                        v = probe(got, "expired_served" if job.kind == "expired" else "unassigned", job.note)
                    _record(report, db, pass_, job, source.name, v)
                done += 1

        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            for s in self.sources:
                if isinstance(s, HttpSource):
                    await stack.enter_async_context(s)
            for _ in range(self.concurrency):
                tg.create_task(worker())
            for job in jobs:
                await queue.put(job)
                if progress:
                    progress.update(done)
            for _ in range(self.concurrency):
                await queue.put(None)


def _record(report: Report, db: WorkDB, pass_: int, job: Job, source: str, v: Verdict) -> None:
    ledger_serial = job.kind in ("assigned", "ledger_error")
    tally = report.checked if ledger_serial else report.probed
    tally[source] = tally.get(source, 0) + 1
    if ledger_serial or v.cls != "ok":
        per = report.counts.setdefault(source, {}).setdefault(v.cls, {})
        per[job.issuer] = per.get(job.issuer, 0) + 1
    if v.cls != "ok":
        report.finding_count += 1
        db.add_finding(pass_, job, source, v)


class FixResult(msgspec.Struct):
    """What ``--fix`` did: ``resigned`` ledger serials handed to the
    pipeline (forced re-sign, publish, CDN purge; ``run`` its summary),
    ``deleted`` store objects of serials that must not be served,
    ``left`` findings it cannot act on (store keys naming no configured
    issuer), ``in_error`` findings of serials whose ledger row is in error
    (assigned, state unknown: neither re-signed nor deleted), ``kept``
    objects of serials the ledger does not know, not deleted because
    ledger rows in error name no serial (one may be theirs), ``errors``
    deletions that failed."""

    resigned: int = 0
    deleted: int = 0
    left: int = 0
    in_error: int = 0
    kept: int = 0
    errors: list[str] = []
    run: Summary | None = None


def fix(audit: Audit, db: WorkDB) -> FixResult:
    """Remedy every pass-1 finding: an unexpired ledger serial is re-signed
    and republished through ``pipeline.run`` (forced, purged); the object of
    an expired or unknown serial is deleted from the config's store (the
    origin then answers unauthorized). A serial a ledger error names is
    left as it is (its state is unknown; the pipeline would not publish
    it either), and so is the object of an unknown serial while ledger rows
    in error name no serial: it may be an issued certificate's (MRSP §5.4).
    The finding serials are held in memory (the pipeline holds its due
    list too)."""
    from ocspmint.pipeline import Force, run

    result = FixResult()
    resign: set[tuple[str, int]] = set()
    deletes: list[str] = []
    now = utc_now()
    for issuer, serial_text, key in db.targets(1):
        if issuer not in audit.issuers or not serial_text:
            result.left += 1
            continue
        serial = int(serial_text, 16)
        if db.error(issuer, serial) is not None:
            result.in_error += 1
            continue
        entry = db.entry(issuer, serial)
        if entry is not None and entry.not_after > now:
            resign.add((issuer, serial))
        elif entry is None and audit.unnamed:
            result.kept += 1
        else:
            deletes.append(key)
    store = audit.store.store if audit.store else open_store(audit.config.store.url, audit.config.store)
    try:
        for key in deletes:
            try:
                store.delete(key)
                result.deleted += 1
            except StoreError as e:
                result.errors.append(str(e))
    finally:
        if audit.store is None:
            store.close()
    if resign:
        result.run = run(audit.config, show_progress=audit.show_progress,
                         select=lambda e: (e.issuer, e.serial) in resign,
                         force=Force(why="audit-fix", since=utc_now(), purge=True))
        result.resigned = len(resign)
    return result


def _finding(row: tuple[str, str, str, str, str, str]) -> Finding:
    issuer, serial, key, source, cls, detail = row
    return Finding(issuer, serial, source, cls, detail if issuer and serial else f"{key}: {detail}")


def write_json(out: TextIO, report: Report, db: WorkDB, pass_: int) -> None:
    """``report`` as one JSON object whose ``findings`` list (most severe
    first) is streamed from ``db``."""
    out.write(msgspec.json.encode(report).decode()[:-1] + ',"findings":[')
    for n, row in enumerate(db.findings(pass_)):
        out.write(("," if n else "") + "\n" + msgspec.json.encode(_finding(row)).decode())
    out.write("]}")


def write_text(out: TextIO, report: Report, db: WorkDB, pass_: int) -> None:
    """A table by class (most severe first) and issuer for each source,
    then the first TEXT_FINDINGS findings and ledger errors."""
    for source, url in report.sources.items():
        counts = report.counts.get(source, {})
        out.write(f"{source} {url}: {report.checked.get(source, 0)} ledger serials checked, "
                  f"{report.probed.get(source, 0)} expired or unknown serials probed\n")
        issuers = sorted({i for per in counts.values() for i in per})
        rows = [["class", *(i or "(no issuer)" for i in issuers), "total"]]
        rows += [[c, *(str(counts[c].get(i, 0)) for i in issuers), str(sum(counts[c].values()))]
                 for c in CLASSES if c in counts]
        widths = [max(len(r[n]) for r in rows) for n in range(len(rows[0]))]
        for r in rows:
            out.write("  " + r[0].ljust(widths[0]) + "".join("  " + v.rjust(w) for v, w in zip(r[1:], widths[1:])) + "\n")
    if report.finding_count:
        out.write("findings, most severe first:\n")
    for n, row in enumerate(db.findings(pass_)):
        if n == TEXT_FINDINGS:
            out.write(f"  ... and {report.finding_count - n} more findings (see --json)\n")
            break
        f = _finding(row)
        out.write(f"  {f.cls:<17} {f.source:<5} {f.issuer or '-'} {f.serial or '-'}: {f.detail}\n")
    for e in report.ledger_errors:
        out.write(f"  LEDGER {e}\n")
    if report.ledger_error_count > len(report.ledger_errors):
        out.write(f"  ... and {report.ledger_error_count - len(report.ledger_errors)} more ledger errors\n")
    out.write("all ok\n" if report.ok else f"{report.finding_count} findings, {report.ledger_error_count} ledger errors\n")


def make_audit(config: Config, *, store: str | None = None, url: str | None = None, issuer: str | None = None,
               serials: str | None = None, concurrency: int = 32, show_progress: bool = True,
               fixing: bool = False) -> Audit:
    """An Audit from the command's options: ``store`` a store URL ("" for
    the config's; audited also when ``url`` is None), ``url`` an HTTP base
    URL, ``serials`` a serial list file (``selection.read_serial_list``).
    Raises AuditError."""
    if concurrency < 1:
        raise AuditError("--concurrency must be at least 1")
    issuers = load_issuers(config)
    if issuer and issuer not in issuers:
        raise AuditError(f"--issuer {issuer!r}: no issuer of that name in the config")
    try:
        listed = read_serial_list(serials) if serials else None
    except SelectionError as e:
        raise AuditError(str(e)) from None
    sources: list[Source] = []
    if store is not None or not url:
        store = store or config.store.url
        if fixing and store != config.store.url:
            raise AuditError("--fix publishes to the config's store: audit that one (--store without a URL)")
        try:
            sources.append(StoreSource(open_store(store, config.store), store))
        except StoreError as e:
            raise AuditError(str(e)) from None
    if url:
        if not re.match(r"https?://", url):
            raise AuditError(f"--url {url!r}: give an http:// or https:// base URL")
        sources.append(HttpSource(url, config.response.certid_hashes[0], config.verify_served.timeout.total_seconds(),
                                  concurrency))
    return Audit(config, issuers, {issuer} if issuer else set(issuers), sources, serials=listed,
                 concurrency=concurrency, show_progress=show_progress)


def audit_command(config: Config, *, store: str | None = None, url: str | None = None, issuer: str | None = None,
                  serials: str | None = None, concurrency: int = 32, show_progress: bool = True, fixing: bool = False,
                  as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """`ocspmint audit` (options as in ``make_audit``): print the report,
    text or JSON; return 0 when clean (with ``fixing``: when the re-audit
    is clean), 1 on any finding or ledger error, 2 when the audit cannot
    run (an option, a ledger source or the store listing unusable)."""
    try:
        audit = make_audit(config, store=store, url=url, issuer=issuer, serials=serials, concurrency=concurrency,
                           show_progress=show_progress, fixing=fixing)
    except AuditError as e:
        print(f"ocspmint: {e}", file=sys.stderr)
        return 2
    try:
        with WorkDB(config.state_dir) as db:
            report = audit.first_pass(db)
            if not fixing:
                (write_json if as_json else write_text)(out, report, db, 1)
                out.write("\n" if as_json else "")
                return 0 if report.ok else 1
            result = fix(audit, db)
            final = audit.recheck(db)
            _write_fixed(out, as_json, report, result, final, db)
            return 0 if final.ok and not report.ledger_error_count else 1
    except (AuditError, StoreError) as e:
        print(f"ocspmint: {e}", file=sys.stderr)
        return 2
    finally:
        audit.close()


def _write_fixed(out: TextIO, as_json: bool, report: Report, result: FixResult, final: Report, db: WorkDB) -> None:
    if as_json:
        out.write('{"audit":')
        write_json(out, report, db, 1)
        out.write(f',"fix":{msgspec.json.encode(result).decode()},"reaudit":')
        write_json(out, final, db, 2)
        out.write(f',"ok":{"true" if final.ok and not report.ledger_error_count else "false"}}}\n')
        return
    out.write("audit:\n")
    write_text(out, report, db, 1)
    out.write(f"fix: {result.resigned} serials re-signed and republished, {result.deleted} objects deleted, "
              f"{result.left} findings left alone (keys of no configured issuer)\n")
    if result.in_error:
        out.write(f"  {result.in_error} findings of serials whose ledger row is in error left alone (state unknown)\n")
    if result.kept:
        out.write(f"  {result.kept} objects of serials the ledger does not know kept: ledger rows in error name "
                  "no serial, one may be theirs\n")
    for e in result.errors:
        out.write(f"  DELETE FAILED {e}\n")
    if result.run is not None and not result.run.ok:
        out.write(result.run.text() + "\n")
    out.write("re-audit of the findings:\n")
    write_text(out, final, db, 2)


def audit_selection(config: Config, select: Callable[[LedgerEntry], bool]) -> dict:
    """Audit the config's store for the ledger entries ``select`` accepts
    (the end of `ocspmint reissue`): the Report as a dict, with
    ``findings`` the list of findings (dicts) and ``text`` the text output.
    Raises AuditError."""
    audit = make_audit(config, store="", show_progress=False)
    audit.select = select
    try:
        with WorkDB(config.state_dir) as db:
            report = audit.first_pass(db)
            text = io.StringIO()
            write_text(text, report, db, 1)
            findings = [msgspec.to_builtins(_finding(row)) for row in db.findings(1)]
    finally:
        audit.close()
    return {**msgspec.to_builtins(report), "findings": findings, "text": text.getvalue()}
