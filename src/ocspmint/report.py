"""Run summary (JSON-able msgspec Struct) and progress display.

Progress goes to stderr: a rich progress bar (count, rate, ETA) on a
terminal, one JSON log line every ``interval`` seconds otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from collections.abc import Callable

import msgspec


class Failure(msgspec.Struct, frozen=True):
    """Something due that was not published and verified.

    ``stage``: ledger, sign, verify, store, clock or served; ``serial`` 40
    lowercase hex digits (``model.serial_hex``) or "" for a ledger row that
    could not be read (``source`` names file and line; for ``served``, the
    URL fetched). docs/output.md is the JSON contract.
    """

    stage: str
    message: str
    issuer: str = ""
    serial: str = ""
    source: str = ""


class PurgeResult(msgspec.Struct):
    """One purge target after a run: ``sent`` purges acknowledged, ``pending``
    still queued in the journal (retried by the next run), ``error`` the
    last failure."""

    sent: int = 0
    pending: int = 0
    error: str = ""


class Summary(msgspec.Struct):
    started: dt.datetime
    finished: dt.datetime | None = None
    seconds: float = 0.0
    plan: str = "full"  # "incremental", or "full" with why an --incremental run could not be
    ledger_entries: int = 0
    expired: int = 0
    up_to_date: int = 0
    due: dict[str, int] = msgspec.field(default_factory=dict)
    published: int = 0
    verified: int = 0
    signer_restarts: int = 0
    signer_backend: dict[str, str] = msgspec.field(default_factory=dict)  # issuer -> native, python or software-key
    purges: dict[str, PurgeResult] = msgspec.field(default_factory=dict)
    served_checked: int = 0
    per_second: float = 0.0
    by_status: dict[str, int] = msgspec.field(default_factory=dict)
    by_kind: dict[str, int] = msgspec.field(default_factory=dict)
    by_issuer: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    failures: list[Failure] = msgspec.field(default_factory=list)
    ok: bool = False

    def count(self, issuer: str, status: str, kind: str) -> None:
        self.published += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        per = self.by_issuer.setdefault(issuer, {})
        per[status] = per.get(status, 0) + 1

    def finish(self, planned: Counter[str]) -> None:
        self.finished = dt.datetime.now(dt.timezone.utc)
        self.seconds = round((self.finished - self.started).total_seconds(), 3)
        self.expired = planned.get("expired", 0)
        self.up_to_date = planned.get("up_to_date", 0)
        self.due = {k: v for k, v in planned.items() if k not in ("expired", "up_to_date")}
        self.ledger_entries = sum(planned.values())
        self.per_second = round(self.published / self.seconds, 1) if self.seconds else 0.0
        self.ok = (not self.failures and self.published == sum(self.due.values())
                   and not any(p.pending for p in self.purges.values()))

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    def text(self) -> str:
        lines = [
            f"ledger entries {self.ledger_entries}: due {sum(self.due.values())} {dict(sorted(self.due.items()))}, "
            f"up to date {self.up_to_date}, expired (not re-signed) {self.expired}; plan: {self.plan}",
            f"published {self.published}, verified before publication {self.verified}, "
            f"in {self.seconds:.1f}s ({self.per_second}/s); by status {self.by_status}; by kind {self.by_kind}",
        ]
        for name, p in sorted(self.purges.items()):
            lines.append(f"purge {name}: {p.sent} acknowledged, {p.pending} still queued" + (f" ({p.error})" if p.error else ""))
        if self.served_checked:
            lines.append(f"served responses fetched and verified: {self.served_checked}")
        if self.signer_backend:
            lines.append("signing backend: " + ", ".join(f"{i} {b}" for i, b in sorted(self.signer_backend.items())))
        if self.signer_restarts:
            lines.append(f"signer processes died and were replaced: {self.signer_restarts}")
        for issuer, counts in sorted(self.by_issuer.items()):
            lines.append(f"  issuer {issuer}: {counts}")
        for f in self.failures[:50]:
            where = " ".join(filter(None, [f.issuer, f.serial and f"serial 0x{f.serial.lstrip('0') or '0'}", f.source and f"({f.source})"]))
            lines.append(f"  FAILED [{f.stage}] {where}: {f.message}")
        if len(self.failures) > 50:
            lines.append(f"  ... and {len(self.failures) - 50} more failures (see --json)")
        pending = sum(p.pending for p in self.purges.values())
        lines.append("OK" if self.ok else f"NOT OK: {len(self.failures)} failures, {pending} purges pending")
        return "\n".join(lines)


class Progress:
    """Reports (done, total) with rate and ETA; call ``update`` often."""

    def __init__(self, total: int | Callable[[], int | None], label: str, interval: float = 5.0) -> None:
        """``total``: the count, or a function giving it (None while it is
        not known yet: a plan still running; no ETA then)."""
        self._total, self.label, self.interval = total, label, interval
        self.start = self._last = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TaskProgressColumn, TimeRemainingColumn

            self._bar = Bar("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                            TaskProgressColumn(), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=self.total)

    @property
    def total(self) -> int | None:
        return self._total() if callable(self._total) else self._total

    def update(self, done: int) -> None:
        total = self.total
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            rate = done / (now - self.start)
            eta = (total - done) / rate if rate and total is not None else None
            line = {"event": "progress", "stage": self.label, "done": done, "total": total,
                    "per_second": round(rate, 1), "eta_seconds": None if eta is None else round(eta)}
            print(json.dumps(line), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
