"""Command line: ``ocspmint run|ingest|verify|serve|audit|reissue|refresh|demo``.

Exit status: 0 everything due was published and verified (or every
response checked is clean); 1 something due was not done or a finding was
reported; 2 the config, an issuer or a signer setting is unusable, or a
file or folder the command needs cannot be opened (the `ingest --into`
ledger database, the state folder or its journal, a response file given
to `verify`, a ledger source `verify` reads, the `demo --dir` folder).
Every such error is one line on stderr, ``ocspmint: <path>: <why>``, never
a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sqlite3
import sys
from pathlib import Path

import msgspec

from ocspmint.config import Config, ConfigError, load_config
from ocspmint.issuer import IdentityError
from ocspmint.model import LedgerError
from ocspmint.pkcs11uri import UriError


class Unusable(Exception):
    """A file or folder the command needs cannot be opened; the message
    names it. ``main`` prints it as one line and exits 2."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _state(cfg: Config, journal: bool = True) -> None:
    """Check before any work that the state folder can be made and, with
    ``journal``, that its journal opens (the journal creates or migrates
    itself here, as the command would next). Raises Unusable: without this
    check the pipeline, audit and reissue fail deep inside with a Python
    traceback (FileExistsError, sqlite3.DatabaseError, ...)."""
    from ocspmint.journal import Journal

    state = Path(cfg.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is not a folder" if isinstance(e, FileExistsError) else e.strerror
        raise Unusable(f"{state}: cannot use state folder: {why}") from None
    if not journal:
        return
    try:
        Journal(state).close()
    except (sqlite3.Error, OSError) as e:
        raise Unusable(f"{state / 'journal.sqlite'}: cannot open journal: {e}") from None


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
    _state(cfg)
    summary = run(cfg, show_progress=not args.quiet, incremental=args.incremental)
    sys.stdout.write(summary.to_json().decode() + "\n" if args.json else summary.text() + "\n")
    return 0 if summary.ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    from ocspmint.issuer import load_issuers
    from ocspmint.ledger.sqlite import ingest

    cfg = _config(args)
    issuers = load_issuers(cfg)
    try:
        report = ingest(args.into, [s for s in cfg.sources if s.type != "sqlite"], issuers, cfg.on_error)
    except LedgerError as e:  # the ledger database cannot be opened, or failed while written
        raise Unusable(f"{e}{_open_hint(args.into)}") from None
    print(report.text())
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from ocspmint.store import StoreError
    from ocspmint.verify_cmd import verify_command

    cfg = _config(args)
    for f in args.files:  # before any output: verify_command reads them with the whole ledger in memory
        try:
            open(f, "rb").close()
        except OSError as e:
            raise Unusable(f"{f}: cannot read response file: {e.strerror}") from None
    try:
        return verify_command(cfg, args.files, args.store, args.json)
    except LedgerError as e:  # raised (not yielded) only for a source that is unusable as a whole
        raise Unusable(f"ledger source unusable: {e}") from None
    except StoreError as e:
        raise Unusable(str(e)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from ocspmint.responder import serve

    return serve(_config(args), listen=args.listen)


def cmd_audit(args: argparse.Namespace) -> int:
    from ocspmint.audit import audit_command

    cfg = _config(args)
    _state(cfg, journal=args.fix)  # its work file lives in the state folder; --fix runs the pipeline
    return audit_command(cfg, as_json=args.json, fixing=args.fix, store=args.store, url=args.url,
                         issuer=args.issuer, serials=args.serials, concurrency=args.concurrency,
                         show_progress=not args.quiet)


def cmd_refresh(args: argparse.Namespace) -> int:
    from ocspmint.refresh import refresh_service

    _state(_config(args))  # the service loads the config itself; a SIGHUP reload is not checked here
    return refresh_service(args.config)


def _utc(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (2026-01-31T00:00:00Z)") from None
    if t.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z (UTC)")
    return t.astimezone(dt.timezone.utc)


def cmd_reissue(args: argparse.Namespace) -> int:
    from ocspmint.audit import AuditError
    from ocspmint.reissue import dry_run, reissue
    from ocspmint.selection import SelectionError, selection

    cfg = _config(args)
    _state(cfg)
    try:
        sel = selection(args.issuer, args.serials, args.issued_after, args.issued_before, args.status, args.all)
        if args.dry_run:
            plan = dry_run(cfg, sel, args.reason, args.rate)
            print(msgspec.json.encode(plan).decode() if args.json else plan.text())
            return 0 if plan.ok else 1
        out = reissue(cfg, sel, args.reason, args.rate, not args.no_purge, not args.quiet)
    except SelectionError as e:
        print(f"ocspmint: {e}", file=sys.stderr)
        return 2
    except AuditError as e:  # the closing audit of the selection cannot run (a ledger source unusable)
        print(f"ocspmint: {e}; REISSUE NOT DONE: run the same command again to resume", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out), indent=2).decode() + "\n")
    else:
        print(f"reissue job {out.job} ({'resumed' if out.resumed else 'new'}): {out.reason}")
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
        print(f"{root} exists and is not empty; remove it or pass --dir", file=sys.stderr)
        return 2
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unusable(f"{root}: cannot make the demo folder: {e.strerror}") from None
    demo = build_demo(root)
    print(f"demo CA, SoftHSM2 token and config made in {root}")
    import os

    os.environ["SOFTHSM2_CONF"] = str(demo.softhsm_conf)  # inherited by the spawned signers
    summary = run(load_config(demo.config), show_progress=not args.quiet)
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
    ri.add_argument("--reason", required=True, help="why (recorded in the journal with every response)")
    ri.add_argument("--issuer", action="append", default=[], help="select an issuer by config name (repeatable)")
    ri.add_argument("--serials", default="", metavar="FILE", help="select the hex serials listed in FILE")
    ri.add_argument("--issued-after", type=_utc, metavar="TIME", help="select notBefore ≥ TIME (ISO 8601 UTC)")
    ri.add_argument("--issued-before", type=_utc, metavar="TIME", help="select notBefore < TIME")
    ri.add_argument("--status", choices=["good", "revoked"], default="")
    ri.add_argument("--all", action="store_true", help="select every entry")
    ri.add_argument("--rate", type=float, default=0.0, help="at most this many responses/s (0: no cap)")
    ri.add_argument("--no-purge", action="store_true", help="do not purge the CDN (routine re-signing)")
    ri.add_argument("--dry-run", action="store_true", help="print what would be done and how long it would take")
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
    except (ConfigError, IdentityError, UriError, Unusable) as e:
        print(f"ocspmint: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
