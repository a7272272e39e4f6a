"""What one source serves for one serial, as exactly one audit class
(`ocspmint audit`, docs/audit.md).

Sources: ``StoreSource`` reads the object at ``store.object_key`` from a
store; ``HttpSource`` sends a real OCSP GET request (RFC 6960 App. A.1,
built by pyca cryptography: ``served.get_url``) to a base URL, the origin
or a CDN. Each gives a ``Fetched``. ``classify`` judges it against the
ledger entry with the verifier (``verify_response``, ``finding_class``)
plus what only an audit can see: the BR 4.9.9 refresh point (``stale``),
Microsoft's 7-day cap and, over HTTP, the RFC 5019 §6 headers. ``probe``
judges a serial that must not be served: unknown to the ledger, or expired.
``in_error`` reports what is served for a serial whose ledger row is in
error (a ``LedgerError`` naming it, two sources stating it differently):
assigned, in a state the ledger does not tell. When several classes apply,
the first in ``CLASSES`` wins.

``Job`` is one serial (or store key) to check; ``WorkDB`` the audit's
temporary SQLite file holding the selected ledger and the findings, so
that memory does not grow with the ledger.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import yarl

from ocspmint.config import Response
from ocspmint.issuer import IssuerIdentity
from ocspmint.model import UTC, Kind, LedgerEntry, Reason, Status, serial_hex
from ocspmint.planner import refresh_point
from ocspmint.respcache import parse_stored
from ocspmint.served import get_url, header_findings
from ocspmint.store import Store, StoreError, pid_alive
from ocspmint.verifier import Expectation, describe, finding_class, verify_response

# Most severe first: a response that cannot be read, or that is not what
# the configured signer said about this certificate, tells nothing reliable
# about status or times, so those classes hide the later ones.
# A serial a ledger error names (``ledger_error``) was assigned in a state the
# ledger does not tell: nothing served for it can be judged.
CLASSES = ("unassigned", "ledger_error", "missing", "http_error", "time_format", "malformed", "unauthorized",
           "wrong_signer", "bad_signature", "wrong_serial", "wrong_status", "unknown", "expired", "validity_too_long",
           "stale", "expired_served", "ok")
RANK = {c: n for n, c in enumerate(CLASSES)}
# Microsoft's root program caps the inclusive interval at 7 days, stricter
# than BR 4.9.9's 10 days; the stricter rule wins (docs/ocsp-rules.md).
MAX_INTERVAL = dt.timedelta(days=7)
DETAIL_MAX = 600  # characters of detail kept per finding
_ONE_SECOND = dt.timedelta(seconds=1)


class Fetched(NamedTuple):
    """What a source gave: ``body`` None when nothing is there (no object,
    HTTP 404); ``error`` a store or transport failure or an HTTP status
    other than 200/404; ``headers`` (lower-case names) over HTTP only."""

    body: bytes | None
    error: str = ""
    headers: dict[str, str] | None = None


class Verdict(NamedTuple):
    cls: str
    detail: str = ""


OK = Verdict("ok")


def _t(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _pick(found: list[tuple[str, str]]) -> Verdict:
    """The most severe of (class, finding) pairs; its findings first in the detail."""
    if not found:
        return OK
    cls = min((c for c, _ in found), key=RANK.__getitem__)
    detail = "; ".join([f for c, f in found if c == cls] + [f for c, f in found if c != cls])
    return Verdict(cls, detail[:DETAIL_MAX])


def classify(got: Fetched, ident: IssuerIdentity, entry: LedgerEntry, settings: Response, now: dt.datetime) -> Verdict:
    """Class of what a source serves for an assigned, unexpired ``entry``.

    ``settings`` gives the CertID hashes a response must carry and
    ``refresh_after``: at ``now`` ≥ the refresh point (thisUpdate +
    refresh_after, or 8 h before nextUpdate if earlier; planner.refresh_point)
    the response is ``stale`` (BR 4.9.9). An unsigned error response other than
    unauthorized is ``http_error`` over HTTP and ``malformed`` in a store
    (the origin cannot serve it). Over HTTP an otherwise clean response
    with wrong RFC 5019 §6 headers is ``http_error``.
    """
    if got.error:
        return Verdict("http_error", got.error)
    if got.body is None:
        return Verdict("missing", "HTTP 404" if got.headers is not None else "no object in the store")
    error_class = "malformed" if got.headers is None else "http_error"
    findings = verify_response(got.body, ident, Expectation(entry, tuple(settings.certid_hashes)), now)
    found = [(error_class if (c := finding_class(f)) == "error_response" else c, f) for f in findings]
    try:
        stored = parse_stored(got.body, "")
    except ValueError:
        return _pick(found)
    this = dt.datetime.fromtimestamp(stored.this_update, UTC)
    nxt = dt.datetime.fromtimestamp(stored.next_update, UTC)
    if nxt - this + _ONE_SECOND > MAX_INTERVAL:
        found.append(("validity_too_long", f"times: validity interval {nxt - this + _ONE_SECOND} (inclusive) "
                                           "over 7 days (Microsoft root program; BR 4.9.9 allows 10)"))
    if now >= (point := refresh_point(this, nxt, settings.refresh_after)):
        found.append(("stale", f"times: refresh point {_t(point)} has passed (thisUpdate + refresh_after "
                               f"{settings.refresh_after}, or 8 h before nextUpdate; BR 4.9.9)"))
    if not found and got.headers is not None:
        found = [("http_error", f"headers: {h}") for h in header_findings(got.headers, got.body, this, nxt)]
    return _pick(found)


def probe(got: Fetched, cls: str, note: str = "") -> Verdict:
    """Class of what a source serves for a serial that must not be served:
    ``cls`` is ``unassigned`` (not in the ledger; BR 4.9.9 never ``good``)
    or ``expired_served`` (its certificate expired). ``ok`` when nothing is
    served: no object in the store, or the 5-byte ``unauthorized`` over
    HTTP. Over HTTP a 404 is ``missing`` and any other non-OCSP answer
    ``malformed`` or ``http_error`` (RFC 5019 §2.2.3: answer unauthorized).
    ``note`` ends the detail of a finding."""
    v = _probe(got, cls)
    return v if v.cls == "ok" or not note else Verdict(v.cls, f"{v.detail}; {note}"[:DETAIL_MAX])


def _probe(got: Fetched, cls: str) -> Verdict:
    if got.error:
        return Verdict("http_error", got.error)
    if got.body is None:
        return OK if got.headers is None else Verdict("missing", "HTTP 404 where unauthorized is due (RFC 5019 §2.2.3)")
    d = describe(got.body)
    status = d["responseStatus"]
    if got.headers is not None and status != "successful":
        if status == "unauthorized":
            return OK
        return Verdict("malformed" if status == "malformed" else "http_error",
                       f"{len(got.body)} bytes ({status}) where unauthorized is due (RFC 5019 §2.2.3)")
    if status != "successful":
        return Verdict(cls, f"a {len(got.body)}-byte object ({status}) is stored")
    detail = f"serves {_said(d)}"
    if cls == "unassigned" and any(r["status"] == "good" for r in d["responses"]):
        detail = f"GOOD for a serial the ledger does not know (BR 4.9.9 forbids it): {detail}"
    return Verdict(cls, detail)


def _said(d: dict) -> str:
    return ", ".join(sorted({f"{r['status']} for serial {r['serial']}" for r in d["responses"]}))


def in_error(got: Fetched, error: str) -> Verdict:
    """Class of what a source serves for a serial whose ledger row is in
    error (``error``: the ledger error naming it, "file:line: why"): the
    serial was assigned (never ``unassigned``: BR 4.9.9, MRSP §5.4), but
    what should be served is unknown, so nothing served, or not served,
    can be judged right: always ``ledger_error``, whatever is served
    (named in the detail). ``--fix`` neither re-signs nor deletes it."""
    if got.error:
        served = got.error
    elif got.body is None:
        served = "HTTP 404" if got.headers is not None else "no object in the store"
    else:
        d = describe(got.body)
        status = d["responseStatus"]
        served = f"serves {_said(d)}" if status == "successful" else f"{len(got.body)} bytes ({status})"
    return Verdict("ledger_error", f"ledger row in error, state unknown ({error}); {served}"[:DETAIL_MAX])


class StoreSource:
    """Objects read from a store (``store.open_store``)."""

    name = "store"

    def __init__(self, store: Store, url: str) -> None:
        self.store, self.url = store, url

    async def fetch(self, key: str, ident: IssuerIdentity | None, serial: int | None) -> Fetched:
        try:
            return Fetched(await self.store.fetch(key))
        except StoreError as e:
            return Fetched(None, f"store: {e}")


class HttpSource:
    """OCSP GET requests to ``url`` with CertIDs of hash ``hash_name``, at
    most ``concurrency`` connections, ``timeout`` seconds per request.
    Use ``async with``: the client session lives on the running loop."""

    name = "http"

    def __init__(self, url: str, hash_name: str, timeout: float, concurrency: int) -> None:
        self.url, self.hash_name, self.timeout, self.concurrency = url, hash_name, timeout, concurrency
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpSource:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, key: str, ident: IssuerIdentity | None, serial: int | None) -> Fetched:
        if ident is None or serial is None or self.session is None:
            raise ValueError(f"{key}: an HTTP request needs the issuer and the serial")
        url = get_url(self.url, ident, serial, self.hash_name)
        try:
            async with self.session.get(yarl.URL(url, encoded=True)) as reply:
                body = await reply.read()
                headers = {k.lower(): v for k, v in reply.headers.items()}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return Fetched(None, f"GET {url}: {type(e).__name__} {e}".strip())
        if reply.status == 404:
            return Fetched(None, headers=headers)
        if reply.status != 200:
            return Fetched(None, f"GET {url}: HTTP {reply.status}", headers)
        return Fetched(body, headers=headers)


Source = StoreSource | HttpSource
_SCHEMA = """
CREATE TABLE ledger (issuer TEXT NOT NULL, serial TEXT NOT NULL, kind TEXT NOT NULL, not_after INTEGER NOT NULL,
  status TEXT NOT NULL, revoked_at INTEGER, reason INTEGER, source TEXT NOT NULL, listed INTEGER NOT NULL,
  PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
CREATE TABLE errors (issuer TEXT NOT NULL, serial TEXT NOT NULL, error TEXT NOT NULL,
  PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
CREATE TABLE findings (pass INTEGER NOT NULL, rank INTEGER NOT NULL, issuer TEXT NOT NULL, serial TEXT NOT NULL,
  key TEXT NOT NULL, source TEXT NOT NULL, class TEXT NOT NULL, detail TEXT NOT NULL);
"""
_NO_ERROR = "NOT EXISTS (SELECT 1 FROM errors e WHERE e.issuer = ledger.issuer AND e.serial = ledger.serial)"


class Job(NamedTuple):
    """One serial (or stray store key) to check in ``sources``. ``kind``:
    assigned (unexpired ledger entry), expired, unlisted (a listed or
    re-checked serial the ledger does not know), stray (a store key the
    ledger does not know), ledger_error (a serial a ledger error names).
    ``note``: the ledger error of a ledger_error job; for the others, what
    a finding's detail ends with."""

    kind: str
    issuer: str
    ident: IssuerIdentity | None
    serial: int | None
    key: str
    entry: LedgerEntry | None
    sources: tuple[Source, ...]
    note: str = ""


def _ts(t: dt.datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def _dt(v: int | None) -> dt.datetime | None:
    return None if v is None else dt.datetime.fromtimestamp(v, UTC)


class WorkDB:
    """The temporary SQLite file ``<folder>/audit-<pid>-*.sqlite``, deleted
    on close (and, when a killed audit left it, by the next audit): table
    ``ledger`` (the selected entries, serial as 40 hex digits, times as
    Unix seconds; with several ledger sources also the entries outside the
    selection, ``listed`` 0, to compare what the next source states),
    ``errors`` (the serials ledger errors name, with the first error) and
    ``findings`` (per pass). No journal, no fsync."""

    def __init__(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for old in Path(folder).glob("audit-*.sqlite"):
            if not pid_alive(old.name.split("-")[1]):
                old.unlink(missing_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=f"audit-{os.getpid()}-", suffix=".sqlite", dir=folder)
        os.close(fd)
        self.db = sqlite3.connect(self.path)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)

    def __enter__(self) -> WorkDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()
        os.unlink(self.path)

    def add_entries(self, entries: Iterable[tuple[LedgerEntry, bool]], sources: bool = False) -> None:
        """(entry, listed) pairs; a serial already held keeps its first
        entry. ``sources``: keep each entry's source (``first``)."""
        self.db.executemany("INSERT OR IGNORE INTO ledger VALUES (?,?,?,?,?,?,?,?,?)", [
            (e.issuer, serial_hex(e.serial), e.kind.value, _ts(e.not_after), e.status.value, _ts(e.revoked_at),
             None if e.reason is None else int(e.reason), e.source if sources else "", int(listed))
            for e, listed in entries])

    def count(self, unexpired_at: dt.datetime | None = None) -> int:
        """Selected entries not in error (unexpired at ``unexpired_at``)."""
        where, args = ("AND not_after > ?", (_ts(unexpired_at),)) if unexpired_at else ("", ())
        return self.db.execute(f"SELECT count(*) FROM ledger WHERE listed AND {_NO_ERROR} {where}", args).fetchone()[0]

    def entries(self) -> Iterator[LedgerEntry]:
        """The selected entries whose serial no ledger error names."""
        for row in self.db.execute(f"SELECT * FROM ledger WHERE listed AND {_NO_ERROR} ORDER BY issuer, serial"):
            yield self._entry(row)

    def entry(self, issuer: str, serial: int) -> LedgerEntry | None:
        """The selected entry of (issuer, serial) (see ``error`` too)."""
        row = self.db.execute("SELECT * FROM ledger WHERE issuer = ? AND serial = ? AND listed",
                              (issuer, serial_hex(serial))).fetchone()
        return None if row is None else self._entry(row)

    def first(self, issuer: str, serial: int) -> LedgerEntry | None:
        """The entry of (issuer, serial) first read, selected or not."""
        row = self.db.execute("SELECT * FROM ledger WHERE issuer = ? AND serial = ?", (issuer, serial_hex(serial))).fetchone()
        return None if row is None else self._entry(row)

    @staticmethod
    def _entry(row: tuple) -> LedgerEntry:
        issuer, serial, kind, not_after, status, revoked_at, reason, source, _ = row
        return LedgerEntry(issuer, int(serial, 16), Kind(kind), _dt(not_after), Status(status), _dt(revoked_at),
                           None if reason is None else Reason(reason), source)

    def add_error(self, issuer: str, serial: int, error: str) -> None:
        """A ledger error naming (issuer, serial); the first one is kept."""
        self.db.execute("INSERT OR IGNORE INTO errors VALUES (?,?,?)", (issuer, serial_hex(serial), error))

    def error(self, issuer: str, serial: int) -> str | None:
        """The first ledger error naming (issuer, serial), None if none."""
        row = self.db.execute("SELECT error FROM errors WHERE issuer = ? AND serial = ?",
                              (issuer, serial_hex(serial))).fetchone()
        return None if row is None else row[0]

    def errors(self) -> Iterator[tuple[str, int, str, bool]]:
        """(issuer, serial, error, whether a selected entry has that serial)
        of every serial a ledger error names."""
        for issuer, serial, error, listed in self.db.execute(
                "SELECT issuer, serial, error, EXISTS (SELECT 1 FROM ledger l WHERE l.issuer = e.issuer "
                "AND l.serial = e.serial AND l.listed) FROM errors e ORDER BY issuer, serial"):
            yield issuer, int(serial, 16), error, bool(listed)

    def add_finding(self, pass_: int, job: Job, source: str, v: Verdict) -> None:
        serial = "" if job.serial is None else serial_hex(job.serial)
        self.db.execute("INSERT INTO findings VALUES (?,?,?,?,?,?,?,?)",
                        (pass_, RANK[v.cls], job.issuer, serial, job.key, source, v.cls, v.detail))

    def findings(self, pass_: int) -> Iterator[tuple[str, str, str, str, str, str]]:
        """(issuer, serial, key, source, class, detail), most severe first."""
        yield from self.db.execute("SELECT issuer, serial, key, source, class, detail FROM findings WHERE pass = ? "
                                   "ORDER BY rank, issuer, serial, key, source", (pass_,))

    def targets(self, pass_: int) -> Iterator[tuple[str, str, str]]:
        """(issuer, serial, key) of every serial or key with a finding."""
        yield from self.db.execute("SELECT DISTINCT issuer, serial, key FROM findings WHERE pass = ?", (pass_,))

    def target_count(self, pass_: int) -> int:
        return self.db.execute("SELECT count(*) FROM (SELECT DISTINCT issuer, serial, key FROM findings WHERE pass = ?)",
                               (pass_,)).fetchone()[0]
