"""Scale of ``ocspmint run``: time per 1,000 responses and peak memory as
the ledger grows, and the cost of an incremental run.

Usage::

    .venv/bin/python bench/scale.py [--sizes 10000 100000 1000000 10000000]
        [--workers 1] [--verify] [--changed 1000] [--dir DIR] [--json FILE] [--markdown]

For each size N, in a fresh folder below ``--dir`` (default: a temp folder
on the root file system):

1. a synthetic SQLite ledger of N entries (unique 16-byte serials from a
   bijection of the row number, ~5 % revoked, ~30 % precertificates);
2. ``ocspmint run --json --quiet`` (a full pass) into a file store: wall
   time, the summary's own rate, seconds per 1,000 responses, and the peak
   RSS of the run's largest process (``wait4`` ru_maxrss: the parent or a
   signer worker);
3. ``ocspmint run --incremental`` with nothing due, then after ``--changed``
   entries were revoked in the ledger: wall time of each (the claim: cost
   follows what is due, not N).

The ceiling printed beside each row is the python-pkcs11 sign loop of
``bench/sign_throughput.py`` measured once at the start (same token, same
worker count), so each row also gives its ratio to the signer's speed.
The folder of size N is removed before the next size. Verification is off
unless ``--verify`` (then every response is verified before it is stored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sign_throughput import ISSUER, RESULTS, ceiling, machine, write_config  # noqa: E402

from ocspmint.demo import build_demo  # noqa: E402
from ocspmint.ledger.sqlite import write_entries  # noqa: E402
from ocspmint.model import Kind, LedgerEntry, Reason, Status, utc_now  # noqa: E402

BIN = Path(sys.executable).parent
MIX = 0x9E3779B97F4A7C15F39CC0605CEDC835  # odd: i → i·MIX mod 2^128 is a bijection


def serial(i: int) -> int:
    return ((i + 1) * MIX) % 2**128 or 1


def entries(n: int, start: int = 0, revoked: bool = False) -> Iterator[LedgerEntry]:
    now = utc_now().replace(microsecond=0)
    for i in range(start, start + n):
        common = dict(issuer=ISSUER, serial=serial(i), kind=Kind.PRECERTIFICATE if i % 10 < 3 else Kind.CERTIFICATE,
                      not_after=now + dt.timedelta(days=90), source="synthetic")
        if revoked or i % 20 == 0:
            yield LedgerEntry(**common, status=Status.REVOKED, revoked_at=now - dt.timedelta(days=1), reason=Reason.keyCompromise)
        else:
            yield LedgerEntry(**common, status=Status.GOOD)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS in MiB of the largest process, summary JSON)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not out:
        raise SystemExit(f"{' '.join(cmd)} printed nothing:\n{err.decode()[-2000:]}")
    summary = json.loads(out)
    if not summary["ok"]:
        raise SystemExit(f"run not ok: {summary['failures'][:3]}")
    return wall, usage.ru_maxrss // 1024, summary


def measure(demo_env: dict[str, str], config: Path, ledger: Path, n: int, changed: int) -> dict:
    run = [str(BIN / "ocspmint"), "run", "--json", "--quiet", "--config", str(config)]
    wall, rss, summary = timed(run, demo_env)
    if summary["published"] != n:
        raise SystemExit(f"published {summary['published']} of {n}")
    idle_wall, idle_rss, idle = timed(run + ["--incremental"], demo_env)
    assert idle["plan"] == "incremental" and idle["published"] == 0, idle["plan"]
    write_entries(str(ledger), entries(changed, revoked=True))
    inc_wall, _, inc = timed(run + ["--incremental"], demo_env)
    assert inc["plan"] == "incremental" and inc["published"] == changed, (inc["plan"], inc["published"])
    return {"serials": n, "wall_s": round(wall, 2), "per_second": summary["per_second"],
            "s_per_1000": round(1000 * wall / n, 3), "peak_rss_mib": rss,
            "incremental_idle_s": round(idle_wall, 2), "incremental_idle_rss_mib": idle_rss,
            "incremental_changed": changed, "incremental_changed_s": round(inc_wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--verify", action="store_true", help="verify every response before storing it")
    ap.add_argument("--changed", type=int, default=1000, help="entries revoked before the second incremental run")
    ap.add_argument("--dir", type=Path, help="parent folder of the per-size folders (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        demo = build_demo(Path(tmp) / "demo", certs=1, precerts=0, revoke=0)
        env = {**os.environ, **demo.env()}
        limit = ceiling(demo, "ec-p256", 20_000, args.workers)
        print(f"ceiling (python-pkcs11 sign loop, {args.workers} process(es)): {limit:,.0f}/s", flush=True)
        rows = []
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            ledger = folder / "ledger.sqlite"
            t0 = time.perf_counter()
            write_entries(str(ledger), entries(n))
            print(f"{n:,}: ledger written in {time.perf_counter() - t0:.1f}s", flush=True)
            config = write_config(demo, ledger, folder / "run", args.workers, args.verify)
            row = measure(env, config, ledger, n, min(args.changed, n))
            row["ratio_to_ceiling"] = round(row["per_second"] / limit, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(folder)
    base = rows[0]["s_per_1000"]
    print("\n| serials | wall s | responses/s | s per 1,000 (vs smallest) | peak RSS MiB | "
          "incremental, nothing due: s | incremental, changed: s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['serials']:,} | {r['wall_s']:,} | {r['per_second']:,.0f} | {r['s_per_1000']} "
             f"({r['s_per_1000'] / base:.2f}) | {r['peak_rss_mib']} | {r['incremental_idle_s']} | "
             f"{r['incremental_changed_s']} ({r['incremental_changed']:,}) |" for r in rows]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "ceiling_per_second": limit, "workers": args.workers,
                                         "verify": args.verify, "rows": rows}, indent=1))
    if args.markdown:
        with RESULTS.open("a") as f:
            f.write(f"\n### Scale, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: workers {args.workers}, "
                    f"verify {'on' if args.verify else 'off'}, ceiling {limit:,.0f}/s\n\n"
                    "| serials | wall s | responses/s | s per 1,000 (vs smallest) | peak RSS MiB | "
                    "incremental, nothing due: s | incremental, changed: s |\n|---:|---:|---:|---:|---:|---:|---:|\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
