"""Command line: ``ocspmint run|ingest|verify|serve|demo``.

Exit status: 0 everything due was published and verified (or every
response checked is clean); 1 something due was not done or a finding was
reported; 2 the config, an issuer or a signer setting is unusable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ocspmint.config import ConfigError, load_config
from ocspmint.issuer import IdentityError
from ocspmint.pkcs11uri import UriError


def _config(args: argparse.Namespace):
    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from ocspmint.pipeline import run

    summary = run(_config(args), show_progress=not args.quiet)
    sys.stdout.write(summary.to_json().decode() + "\n" if args.json else summary.text() + "\n")
    return 0 if summary.ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    from ocspmint.issuer import load_issuers
    from ocspmint.ledger.sqlite import ingest

    cfg = _config(args)
    report = ingest(args.into, [s for s in cfg.sources if s.type != "sqlite"], load_issuers(cfg), cfg.on_error)
    print(report.text())
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from ocspmint.verify_cmd import verify_command

    return verify_command(_config(args), args.files, args.store, args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from ocspmint.responder import serve

    return serve(_config(args), listen=args.listen)


def cmd_demo(args: argparse.Namespace) -> int:
    from ocspmint.demo import build_demo
    from ocspmint.pipeline import run

    root = Path(args.dir).resolve()
    if root.exists() and any(root.iterdir()):
        print(f"{root} exists and is not empty; remove it or pass --dir", file=sys.stderr)
        return 2
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
    d = sub.add_parser("demo", help="build a demo CA + SoftHSM2 token and run once")
    d.add_argument("--dir", default="ocspmint-demo")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, IdentityError, UriError) as e:
        print(f"ocspmint: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
