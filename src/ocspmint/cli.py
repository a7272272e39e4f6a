"""Command line: ``ocspmint run|ingest|verify|serve|audit|reissue|refresh|demo``.

Exit status: 0 everything due was published and verified (or every
response checked is clean); 1 something due was not done or a finding was
reported; 2 the config, an issuer or a signer setting is unusable, or a
file or folder the command needs cannot be opened (the `ingest --into`
ledger database, the state folder or its journal, a response file given
to `verify`, a ledger source `verify` reads, the `demo --dir` folder or
the tools the demo needs, the store a command writes to), the state
folder is in use by another ocspmint, or the journal failed while written
(locked by another program, disk full: ``JournalError``); also a usage
error (argparse's own, or an option value out of range: ``--rate``,
``--issued-after``). Every such error is one line on stderr,
``ocspmint: <path>: <why>``, never a traceback. 130: interrupted
(Ctrl-C), with ``ocspmint: interrupted`` on stderr and nothing on stdout.
With ``--json`` stdout holds exactly one JSON document when the status is
0 or 1, and nothing otherwise (docs/output.md).

A command that writes the journal or the store (`run`, `reissue` but
`--dry-run`, `refresh`, `audit --fix`, `demo`) holds the state folder's
lock (``ocspmint.statelock``) while it runs; a second one exits 2 at once
naming the holder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sqlite3
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ocspmint.config import Config, ConfigError, load_config
from ocspmint.issuer import IdentityError
from ocspmint.journal import JournalError
from ocspmint.model import LedgerError
from ocspmint.pkcs11uri import UriError
from ocspmint.store import StoreError, folder_missing

if TYPE_CHECKING:
    from ocspmint.report import Summary


class Unusable(Exception):
    """A file or folder the command needs cannot be opened; the message
    names it. ``main`` prints it as one line and exits 2."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _state(cfg: Config, journal: bool = True, lock: str = "") -> ExitStack:
    """Check before any work that the state folder can be made and, with
    ``journal``, that its journal opens (the journal creates or migrates
    itself here, as the command would next). Raises Unusable: without this
    check the pipeline, audit and reissue fail deep inside with a Python
    traceback (FileExistsError, sqlite3.DatabaseError, ...).

    With ``lock`` (the command's name), first take the state folder's
    exclusive lock for this process (``statelock``): Unusable at once when
    another ocspmint holds it. The lock is held until the returned
    ExitStack closes (``with _state(...):`` around the command's work) or
    the process ends."""
    from ocspmint.journal import Journal
    from ocspmint.statelock import LOCK_NAME, StateBusy, acquire

    state = Path(cfg.state_dir)
    held = ExitStack()
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is not a folder" if isinstance(e, FileExistsError) else e.strerror
        raise Unusable(f"{state}: cannot use state folder: {why}") from None
    if lock:
        try:
            held.callback(os.close, acquire(state, lock))
        except StateBusy as e:
            raise Unusable(str(e)) from None
        except OSError as e:
            raise Unusable(f"{state / LOCK_NAME}: cannot open the state folder's lock file: {e.strerror}") from None
    if not journal:
        return held
    try:
        Journal(state).close()
    except JournalError as e:  # names the file already: "PATH: cannot open journal: WHY"
        held.close()
        raise Unusable(str(e)) from None
    except (sqlite3.Error, OSError) as e:
        held.close()
        raise Unusable(f"{state / 'journal.sqlite'}: cannot open journal: {e}") from None
    return held


def _store_unusable(cfg: Config, e: StoreError) -> Unusable:
    """A store that cannot be opened at start (no credentials, a bad URL):
    one line naming it. Failures of single objects later are per-item
    failures in the summary, not this."""
    text = str(e)
    return Unusable(text if text.startswith(cfg.store.url) else f"{cfg.store.url}: cannot open the store: {text}")


def _open_hint(path: str) -> str:
    """Why SQLite may say only "unable to open database file" for ``path``."""
    p = Path(path)
    if p.is_dir():
        return " (it is a folder)"
    if not p.parent.is_dir():
        return f" (folder {p.parent} does not exist)" if not p.parent.exists() else f" ({p.parent} is not a folder)"
    return ""


def cmd_run(args: argparse.Namespace) -> int:
    from ocspmint.pipeline import run

    cfg = _config(args)
    with _state(cfg, lock="run"):
        try:
            summary = run(cfg, show_progress=not args.quiet, incremental=args.incremental)
        except StoreError as e:
            raise _store_unusable(cfg, e) from None
        _unfinished_clock_recovery(cfg, summary)
    sys.stdout.write(summary.to_json().decode() + "\n" if args.json else summary.text() + "\n")
    return 0 if summary.ok else 1


def _unfinished_clock_recovery(cfg: Config, summary: Summary) -> None:
    """Fail the run while a `reissue --clock-was-fast` job is unfinished:
    the clock was accepted, but responses dated in the future may still be
    published, and `run` does not re-sign them before their refresh time."""
    from ocspmint.journal import Journal
    from ocspmint.reissue import CLOCK_JOB
    from ocspmint.report import Failure

    with Journal(cfg.state_dir) as journal:
        job = journal.unfinished_job(CLOCK_JOB)
    if job is not None:
        summary.failures.append(Failure(
            "clock", f"reissue job {job.id} (--clock-was-fast: {job.reason}) is not finished: responses dated in the "
                     "future may still be published; run `ocspmint reissue --clock-was-fast --reason ...` again"))
        summary.ok = False


def cmd_ingest(args: argparse.Namespace) -> int:
    from ocspmint.issuer import load_issuers
    from ocspmint.ledger.sqlite import ingest

    cfg = _config(args)
    issuers = load_issuers(cfg)
    try:
        report = ingest(args.into, cfg.sources, issuers, cfg.on_error)  # it skips sqlite sources, and says so
    except LedgerError as e:  # the ledger database cannot be opened, or failed while written
        raise Unusable(f"{e}{_open_hint(args.into)}") from None
    print(report.text())
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from ocspmint.store import StoreError
    from ocspmint.verify_cmd import verify_command

    cfg = _config(args)
    if args.files and args.store:
        raise Unusable("verify: give response files or --store, not both (files are checked as they are)")
    for f in args.files:  # before any output: verify_command reads them with the whole ledger in memory
        try:
            open(f, "rb").close()
        except OSError as e:
            raise Unusable(f"{f}: cannot read response file: {e.strerror}") from None
    try:
        return verify_command(cfg, args.files, args.store, args.json)
    except LedgerError as e:  # raised (not yielded) only for a source that is unusable as a whole
        raise Unusable(f"ledger source unusable: {e}") from None
    except StoreError as e:  # name the store, as `run` does (a file store's message names its folder)
        url, text = args.store or cfg.store.url, str(e)
        raise Unusable(text if url in text or text.startswith("/") else f"{url}: cannot open the store: {text}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from ocspmint.responder import serve

    return serve(_config(args), listen=args.listen)


def cmd_audit(args: argparse.Namespace) -> int:
    from ocspmint.audit import audit_command

    cfg = _config(args)
    store = (args.store or cfg.store.url) if args.store is not None or not args.url else ""
    # its work file lives in the state folder; --fix runs the pipeline (journal, store: the lock)
    with _state(cfg, journal=args.fix, lock="audit --fix" if args.fix else ""):
        if problem := folder_missing(store):
            raise Unusable(problem)
        return audit_command(cfg, as_json=args.json, fixing=args.fix, store=args.store, url=args.url,
                             issuer=args.issuer, serials=args.serials, concurrency=args.concurrency,
                             show_progress=not args.quiet)


def cmd_refresh(args: argparse.Namespace) -> int:
    from ocspmint.refresh import refresh_service

    cfg = _config(args)
    # the service loads the config itself; a SIGHUP reload is not checked here (nor locked: the lock
    # stays on the state folder of the config it started with)
    with _state(cfg, lock="refresh"):
        try:
            return refresh_service(args.config)
        except StoreError as e:
            raise _store_unusable(cfg, e) from None


def _utc(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (2026-01-31T00:00:00Z)") from None
    if t.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z (UTC)")
    try:
        return t.astimezone(dt.timezone.utc)
    except OverflowError:  # 0001-01-01T00:00:00+01:00: before year 1 in UTC
        raise argparse.ArgumentTypeError(f"{text!r} is out of range in UTC (years 1 to 9999)") from None


def _reason(text: str) -> str:
    """``--reason``: not blank (it is the job's record in the journal)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give the reason (recorded in the journal with every response)")
    return text


def _rate(text: str) -> float:
    """``--rate``: responses/s, a finite number ≥ 0 (nan, inf or a negative
    rate would fail deep in the run with a traceback, after the job was
    recorded)."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(rate) or rate < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give responses/s as a finite number ≥ 0 (0: no cap)")
    return rate


def cmd_reissue(args: argparse.Namespace) -> int:
    from ocspmint.audit import AuditError
    from ocspmint.reissue import clock_dry_run, dry_run, recover_clock, reissue
    from ocspmint.selection import SelectionError, selection

    cfg = _config(args)
    selectors = args.issuer or args.serials or args.issued_after or args.issued_before or args.status or args.all
    if args.clock_was_fast and selectors:
        print("ocspmint: --clock-was-fast selects the responses dated in the future itself: give no --issuer, "
              "--serials, --issued-after, --issued-before, --status or --all with it", file=sys.stderr)
        return 2
    # a dry run only reads the journal: it takes no lock, so it may estimate while another command runs
    with _state(cfg, lock="" if args.dry_run else "reissue --clock-was-fast" if args.clock_was_fast else "reissue"):
        try:
            if args.dry_run:
                if args.clock_was_fast:
                    plan = clock_dry_run(cfg, args.rate)
                else:
                    sel = selection(args.issuer, args.serials, args.issued_after, args.issued_before, args.status, args.all)
                    plan = dry_run(cfg, sel, args.reason, args.rate)
                # "ok" as in every other command's JSON (a property: msgspec does not encode it)
                print(msgspec.json.encode({**msgspec.to_builtins(plan), "ok": plan.ok}).decode() if args.json
                      else plan.text())
                return 0 if plan.ok else 1
            if args.clock_was_fast:
                out = recover_clock(cfg, args.reason, args.rate, not args.no_purge, not args.quiet)
            else:
                sel = selection(args.issuer, args.serials, args.issued_after, args.issued_before, args.status, args.all)
                out = reissue(cfg, sel, args.reason, args.rate, not args.no_purge, not args.quiet)
        except SelectionError as e:
            print(f"ocspmint: {e}", file=sys.stderr)
            return 2
        except AuditError as e:  # the closing audit of the selection cannot run (a ledger source unusable)
            print(f"ocspmint: {e}; REISSUE NOT DONE: run the same command again to resume", file=sys.stderr)
            return 2
        except StoreError as e:
            raise _store_unusable(cfg, e) from None
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out), indent=2).decode() + "\n")
    elif out.job == 0:  # --clock-was-fast with nothing to recover
        print(f"{out.clock.text()}: nothing to recover")
        print("REISSUE OK")
    else:
        print(f"reissue job {out.job} ({'resumed' if out.resumed else 'new'}): {out.reason}")
        if out.clock is not None:
            print(out.clock.text())
        print(out.summary.text())
        print(f"audit of the selection: {out.audit.get('text', '')}")
        print("REISSUE OK" if out.ok else "REISSUE NOT DONE: run the same command again to resume")
    return 0 if out.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from ocspmint.demo import build_demo
    from ocspmint.pipeline import run

    root = Path(args.dir).resolve()
    if root.exists() and not root.is_dir():
        raise Unusable(f"{root}: cannot make the demo there: it is not a folder")
    if root.exists() and any(root.iterdir()):
        raise Unusable(f"{root}: cannot make the demo there: the folder is not empty; remove it or pass another --dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unusable(f"{root}: cannot make the demo folder: {e.strerror}") from None
    try:
        demo = build_demo(root)
    except (RuntimeError, OSError) as e:  # a tool missing or failing (openssl, SoftHSM2): its message, on one line
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise Unusable(f"{root}: cannot make the demo: {why} (remove {root} before trying again)") from None
    print(f"demo CA, SoftHSM2 token and config made in {root}")
    os.environ["SOFTHSM2_CONF"] = str(demo.softhsm_conf)  # inherited by the spawned signers
    cfg = load_config(demo.config)
    with _state(cfg, journal=False, lock="demo"):
        summary = run(cfg, show_progress=not args.quiet)
    print(summary.text())
    exe = Path(sys.argv[0]).resolve()
    print(f"\nresponses in {root / 'responses'}; run again with:\n  SOFTHSM2_CONF={demo.softhsm_conf} {exe} run --config {demo.config}")
    return 0 if summary.ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ocspmint", description="Pre-generate, verify and publish OCSP responses.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="sign, verify and publish every due response")
    r.add_argument("--config", required=True, help="TOML config file")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--incremental", action="store_true",
                   help="plan only ledger changes since the last complete run and scheduled re-signing "
                        "(one sqlite source; falls back to a full pass and says why)")
    r.set_defaults(func=cmd_run)
    i = sub.add_parser("ingest", help="fill the embedded SQLite ledger from the config's sources")
    i.add_argument("--config", required=True)
    i.add_argument("--into", required=True, help="SQLite ledger file to create or update")
    i.set_defaults(func=cmd_ingest)
    v = sub.add_parser("verify", help="verify response files or a whole store against the issuers and the ledger")
    v.add_argument("--config", required=True)
    v.add_argument("--store", help="store URL to verify (default: the config's store)")
    v.add_argument("--json", action="store_true")
    v.add_argument("files", nargs="*", help="DER response files; none means the whole store")
    v.set_defaults(func=cmd_verify)
    s = sub.add_parser("serve", help="answer OCSP GET/POST requests from the store (RFC 5019 origin)")
    s.add_argument("--config", required=True)
    s.add_argument("--listen", metavar="HOST:PORT", help="listen address (default: the config's [serve] listen)")
    s.set_defaults(func=cmd_serve)
    a = sub.add_parser("audit", help="classify what is served for every ledger serial (store and/or HTTP); --fix remedies")
    a.add_argument("--config", required=True)
    a.add_argument("--store", nargs="?", const="", metavar="URL",
                   help="audit a store (no URL: the config's); the default when --url is not given")
    a.add_argument("--url", metavar="BASE", help="audit over HTTP: OCSP GET requests to this origin or CDN")
    a.add_argument("--issuer", metavar="NAME", help="only this issuer (config name)")
    a.add_argument("--serials", metavar="FILE", help="only the hex serials listed in FILE, one per line")
    a.add_argument("--concurrency", type=int, default=32, help="checks in flight (default 32)")
    a.add_argument("--fix", action="store_true", help="re-sign/delete every finding, then audit those serials again")
    a.add_argument("--json", action="store_true")
    a.add_argument("--quiet", action="store_true", help="no progress output")
    a.set_defaults(func=cmd_audit)
    rf = sub.add_parser("refresh", help="the continuous service: new entries and status changes at once, routine "
                                       "re-signing spread evenly (SIGTERM stops, SIGHUP reloads)")
    rf.add_argument("--config", required=True)
    rf.set_defaults(func=cmd_refresh)
    ri = sub.add_parser("reissue", help="re-sign, publish and purge a selected population now (incident remediation)")
    ri.add_argument("--config", required=True)
    ri.add_argument("--reason", required=True, type=_reason, help="why (recorded in the journal with every response)")
    ri.add_argument("--issuer", action="append", default=[], help="select an issuer by config name (repeatable)")
    ri.add_argument("--serials", default="", metavar="FILE", help="select the hex serials listed in FILE")
    ri.add_argument("--issued-after", type=_utc, metavar="TIME", help="select notBefore ≥ TIME (ISO 8601 UTC)")
    ri.add_argument("--issued-before", type=_utc, metavar="TIME", help="select notBefore < TIME")
    ri.add_argument("--status", choices=["good", "revoked"], default="")
    ri.add_argument("--all", action="store_true", help="select every entry")
    ri.add_argument("--rate", type=_rate, default=0.0, help="at most this many responses/s (0: no cap)")
    ri.add_argument("--no-purge", action="store_true", help="do not purge the CDN (routine re-signing)")
    ri.add_argument("--dry-run", action="store_true", help="print what would be done and how long it would take")
    ri.add_argument("--clock-was-fast", action="store_true",
                    help="the clock ran fast and is right now (you checked it): accept it although it is behind the "
                         "journal's latest time, and re-sign every response dated in the future (docs/faults.md)")
    ri.add_argument("--json", action="store_true")
    ri.add_argument("--quiet", action="store_true")
    ri.set_defaults(func=cmd_reissue)
    d = sub.add_parser("demo", help="build a demo CA + SoftHSM2 token and run once")
    d.add_argument("--dir", default="ocspmint-demo")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, IdentityError, UriError, Unusable, JournalError) as e:
        print(f"ocspmint: {e}", file=sys.stderr)
        return 2
    except StoreError as e:  # a store unusable as a whole, where no command names it (see _store_unusable)
        print(f"ocspmint: store: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ocspmint: interrupted", file=sys.stderr)
        return 130
