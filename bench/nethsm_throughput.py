"""Throughput against a simulated network HSM, by sessions in flight.

Usage::

    .venv/bin/python bench/nethsm_throughput.py [--latency-ms 2] [--slots 16]
        [--sessions 1,2,4,8,16,32] [--processes 1] [--seconds 2] [--warmup 0.3]
        [--transport p11kit,shim] [--key ec-p256|rsa-2048]
        [--series c-loop,ocspmint-native,ocspmint-pool,ocspmint-run,PKG.MODULE:FUNCTION]
        [--batch-size 256] [--store-dir DIR] [--json FILE]

The HSM (tests/nethsm.py) is SoftHSM2 with the p11fault shim in front: each
signature waits ``--latency-ms`` inside one of ``--slots`` slots shared by
every process, so its capacity is slots / latency signatures per second.
Transports:

- ``p11kit``: the shim and SoftHSM2 sit behind ``p11-kit server`` on a unix
  socket and the client loads p11-kit-client.so, like a network HSM's
  client library. p11-kit answers one call at a time per client process,
  so the sessions of one process do not add up (only processes do).
- ``shim``: the client loads the shim directly, without p11-kit. The
  sessions really are in flight together.

Series: ``c-loop`` (built in) is bench/p11loop/p11_sign_loop.c, the raw C
PKCS#11 sign loop: ``--processes`` processes x S sessions, one thread per
session, for ``--seconds`` after ``--warmup``. ``ocspmint-native`` (built in)
is ocspmint's C extension, ``_p11native.Signer(sessions=S).sign_batch`` on
batches of 256 digests, in ``--processes`` fresh interpreters;
``ocspmint-pool`` (built in) is a ``SignerPool`` with backend native,
``--processes`` workers and ``sessions=S``, kept full with 256-ResponseData
``SignBatch`` messages (both in bench/stage_load.py); ``ocspmint-run`` (built
in) is ``ocspmint run`` end to end with ``[signing] sessions = S`` over a
ledger of capacity x ``--seconds`` new serials, timed by its own summary
(ledger pass and start-up included), verification on;
``ocspmint-run-verify-off`` (built in) is the same with ``verify = false``;
``ocspmint-refresh`` (built in) is the same over a ledger published
beforehand, 3.2 times as large, of which 5/16 is due for refresh (a daily
full run: the ledger pass reads 3.2 rows per response it signs). All but
``ocspmint-run-verify-off`` run by default. Other series plug in by name,
``PKG.MODULE:FUNCTION``, or through ``main(argv, series={name: fn})``. A
series function gets ``(ctx: Context, sessions: int)`` and returns a dict
with at least ``per_second`` (it may add ``signatures``, ``seconds``...).
Its ``ctx`` has the demo (token, config), the running HSM (``ctx.hsm.module``
and ``ctx.hsm.env``), the PIN and the timing flags.

For every transport, series and S, the script prints signatures/s, the
ratio to the capacity slots / latency, the ratio to the series' best
point and, for the series that run a command (``c-loop``, ``ocspmint-run*``,
``ocspmint-refresh``), the CPU cores that command kept busy on average
(user + system CPU of it and its children over its wall time). The
simulated HSM signs with SoftHSM2 on this machine's own CPUs, which a real
network HSM does not: ``c-loop``'s cores are what the HSM itself costs.
``--json FILE`` writes all of it: top-level settings and ``series: [{name,
transport, best_per_second, points: [{sessions, processes, per_second,
ratio_capacity, ratio_best, ...}]}]``, ready for a plot of throughput
against sessions. The demo, the server and its socket
live in a temp folder; SOFTHSM2_CONF and the PIN are passed to child
processes only (the PIN through an environment variable, never in argv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))  # stage_load.py, also when imported through main()

from nethsm import NetHsm, available, nethsm  # noqa: E402  (tests/nethsm.py)

from ocspmint.demo import RESPONDER_LABEL, SOFTHSM_MODULE, TOKEN_LABEL, Demo, build_demo  # noqa: E402

_spec = importlib.util.spec_from_file_location("p11loop_build", ROOT / "bench" / "p11loop" / "build.py")
assert _spec is not None and _spec.loader is not None
p11loop_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(p11loop_build)

MECHANISM = {"ec-p256": "ecdsa", "rsa-2048": "rsa-sha256"}
PIN_VAR = "NETHSM_BENCH_PIN"


@dataclass
class Context:
    """What a series function gets (one transport, one running HSM)."""

    demo: Demo
    hsm: NetHsm
    pin: str
    mechanism: str  # "ecdsa" | "rsa-sha256" (p11_sign_loop's names)
    processes: int
    seconds: float
    warmup: float
    work: Path  # a scratch folder for this transport
    loop: Path  # the p11_sign_loop executable
    store_dir: Path | None = None  # ocspmint-run: state dir and file store below it (default: ``work``)
    batch_size: int = 256  # ocspmint-run*, ocspmint-refresh: ``[signing] batch_size``


SeriesFn = Callable[[Context, int], dict[str, Any]]


def c_loop(ctx: Context, sessions: int) -> dict[str, Any]:
    """The raw C PKCS#11 sign loop, ``ctx.processes`` x ``sessions``."""
    env = ctx.hsm.client_env({"PATH": os.environ.get("PATH", "/usr/bin:/bin"), PIN_VAR: ctx.pin})
    cmd = [str(ctx.loop), ctx.hsm.module, TOKEN_LABEL, RESPONDER_LABEL, ctx.mechanism, "--pin-env", PIN_VAR,
           "--processes", str(ctx.processes), "--sessions", str(sessions), "--seconds", str(ctx.seconds),
           "--warmup", str(ctx.warmup)]
    p, cores = run_child(cmd, env, ctx.seconds + ctx.warmup + 120)
    if p.returncode != 0:
        raise RuntimeError(f"p11_sign_loop failed (exit {p.returncode}): {p.stderr.strip()}")
    return {**json.loads(p.stdout), "cores": cores}


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd`` to its end; also returns the CPU cores it and its
    descendants kept busy on average (user + system CPU seconds over wall
    seconds, from ``getrusage(RUSAGE_CHILDREN)``)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return p, cpu / wall


def ocspmint_native(ctx: Context, sessions: int) -> dict[str, Any]:
    """ocspmint's native signer: ``ctx.processes`` interpreters, each with one
    ``ocspmint._p11native.Signer(sessions=S)`` calling ``sign_batch`` on
    batches of 256 pre-hashed items (bench/stage_load.py ``run_native``)."""
    from stage_load import run_native  # bench/stage_load.py

    return run_native(ctx.hsm.module, TOKEN_LABEL, RESPONDER_LABEL, ctx.mechanism, sessions=sessions,
                      processes=ctx.processes, pin=ctx.pin, env=ctx.hsm.env, seconds=ctx.seconds,
                      warmup=ctx.warmup)


def ocspmint_pool(ctx: Context, sessions: int) -> dict[str, Any]:
    """ocspmint's SignerPool, backend native, ``ctx.processes`` workers with
    ``sessions=S``, kept full with SignBatch messages of 256 real
    ResponseData (bench/stage_load.py ``run_pool``)."""
    import msgspec

    from stage_load import response_data, run_pool  # bench/stage_load.py

    spec, tbs = response_data(ctx.demo.config, "issuing-ca", 256)
    spec = msgspec.structs.replace(spec, module=ctx.hsm.module)
    return run_pool([spec], "issuing-ca", tbs, workers=ctx.processes, backend="native", sessions=sessions,
                    seconds=ctx.seconds, warmup=ctx.warmup, env=ctx.hsm.env)


def ocspmint_run(ctx: Context, sessions: int, verify: bool = True) -> dict[str, Any]:
    """``ocspmint run`` end to end: a SQLite ledger of capacity x
    ``ctx.seconds`` new serials (so a run at full speed lasts about
    ``--seconds``), backend native, ``ctx.processes`` workers with
    ``sessions=S``, verification on (the default; off in the series
    ``ocspmint-run-verify-off``), a fresh file store and
    state dir (below ``--store-dir`` when given). ``per_second`` is the
    summary's: published / the whole run (ledger pass, worker start-up and
    login, the last batches' storing and journaling included). Exits 1
    unless the run published every serial."""
    from sign_throughput import synthetic_entries  # bench/sign_throughput.py

    from ocspmint.ledger.sqlite import write_entries

    assert ctx.hsm.capacity is not None
    serials = round(ctx.hsm.capacity * ctx.seconds)
    ledger = ctx.work / f"ledger-{serials}.sqlite"
    if not ledger.exists():
        write_entries(str(ledger), synthetic_entries(serials))
    return _timed_run(ctx, sessions, ledger, "ocspmint-run", serials, verify=verify)


def _published_ledger(ctx: Context, rows: int) -> tuple[Path, Path, int]:
    """A SQLite ledger of ``rows`` serials, published once (untimed, straight
    to SoftHSM2, no latency) and its journal then aged: rows whose serial
    ends in hex 0-4 (5/16) get thisUpdate and nextUpdate 6 days earlier,
    past their refresh point. Returns (ledger, aged journal, rows due);
    made once per transport."""
    import sqlite3

    from sign_throughput import checked_summary, synthetic_entries, write_config  # bench/sign_throughput.py

    from ocspmint.ledger.sqlite import write_entries

    ledger, journal = ctx.work / f"refresh-{rows}.sqlite", ctx.work / f"refresh-{rows}-journal.sqlite"
    if not journal.exists():
        write_entries(str(ledger), synthetic_entries(rows))
        run_dir = (ctx.store_dir or ctx.work) / f"ocspmint-refresh-{os.getpid()}-first"
        config = write_config(ctx.demo, ledger, run_dir, 1, False)
        p = subprocess.run([str(Path(sys.executable).parent / "ocspmint"), "run", "--config", str(config), "--json",
                            "--quiet"], env={**os.environ, "SOFTHSM2_CONF": str(ctx.demo.softhsm_conf)},
                           capture_output=True, text=True, timeout=3600)
        checked_summary(p, rows)
        db = sqlite3.connect(run_dir / "state" / "journal.sqlite")
        db.execute("UPDATE published SET this_update = this_update - 518400, next_update = next_update - 518400 "
                   "WHERE substr(serial, -1) IN ('0', '1', '2', '3', '4')")
        db.commit()
        db.execute("VACUUM INTO ?", (str(journal),))
        db.close()
        shutil.rmtree(run_dir)
    db = sqlite3.connect(journal)
    due = db.execute("SELECT count(*) FROM published WHERE substr(serial, -1) IN ('0', '1', '2', '3', '4')").fetchone()[0]
    db.close()
    return ledger, journal, due


def _timed_run(ctx: Context, sessions: int, ledger: Path, name: str, expected: int,
               journal: Path | None = None, verify: bool = True) -> dict[str, Any]:
    """One ``ocspmint run`` (backend native, ``sessions``, ``verify``)
    in a fresh state dir (a copy of ``journal`` when given) and file store;
    its summary's rate and the cores it kept busy. Exits 1 unless it
    published ``expected``."""
    from sign_throughput import checked_summary, write_config  # bench/sign_throughput.py

    run_dir = (ctx.store_dir or ctx.work) / f"{name}-{os.getpid()}-{ctx.processes}x{sessions}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = write_config(ctx.demo, ledger, run_dir, ctx.processes, verify)
    if journal is not None:
        (run_dir / "state").mkdir()
        shutil.copy(journal, run_dir / "state" / "journal.sqlite")
    text = config.read_text().replace(f"module = {json.dumps(SOFTHSM_MODULE)}", f"module = {json.dumps(ctx.hsm.module)}")
    config.write_text(text.replace("[signing]\n", f'[signing]\nbackend = "native"\nsessions = {sessions}\n'
                                                 f'batch_size = {ctx.batch_size}\n', 1))
    env = ctx.hsm.client_env({**os.environ, "SOFTHSM2_CONF": str(ctx.demo.softhsm_conf)})
    p, cores = run_child([str(Path(sys.executable).parent / "ocspmint"), "run", "--config", str(config), "--json",
                          "--quiet"], env, 3600)
    summary = checked_summary(p, expected)
    shutil.rmtree(run_dir)
    return {"per_second": summary["per_second"], "signatures": expected, "seconds": summary["seconds"], "cores": cores}


def ocspmint_refresh(ctx: Context, sessions: int) -> dict[str, Any]:
    """``ocspmint run`` when 5/16 of a published ledger is due for refresh,
    spread through it (a daily full run): the ledger has capacity x
    ``ctx.seconds`` x 16/5 serials, so the signing lasts about ``--seconds``
    and the ledger pass reads 3.2 rows per response (``_published_ledger``).
    Otherwise as ``ocspmint-run``."""
    assert ctx.hsm.capacity is not None
    ledger, journal, due = _published_ledger(ctx, round(ctx.hsm.capacity * ctx.seconds * 16 / 5))
    return _timed_run(ctx, sessions, ledger, "ocspmint-refresh", due, journal)


BUILTIN: dict[str, SeriesFn] = {"c-loop": c_loop, "ocspmint-native": ocspmint_native, "ocspmint-pool": ocspmint_pool,
                                "ocspmint-run": ocspmint_run, "ocspmint-run-verify-off": partial(ocspmint_run, verify=False),
                                "ocspmint-refresh": ocspmint_refresh}
DEFAULT_SERIES = "c-loop,ocspmint-native,ocspmint-pool,ocspmint-run,ocspmint-refresh"


def load_series(spec: str) -> SeriesFn:
    """A built-in name or ``PKG.MODULE:FUNCTION``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    mod, sep, fn = spec.partition(":")
    if not sep:
        raise SystemExit(f"--series {spec!r}: expected one of {', '.join(BUILTIN)} or PKG.MODULE:FUNCTION")
    return getattr(importlib.import_module(mod), fn)


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers >= 1")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=2.0, help="signing latency of the simulated HSM (ms)")
    ap.add_argument("--slots", type=int, default=16, help="signatures the HSM works on at once")
    ap.add_argument("--sessions", type=int_list, default=[1, 2, 4, 8, 16, 32], help="sessions per process")
    ap.add_argument("--processes", type=int, default=1, help="client processes (c-loop)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured time per point")
    ap.add_argument("--warmup", type=float, default=0.3, help="warm-up per point (s)")
    ap.add_argument("--transport", default="p11kit,shim", help="p11kit, shim or both (comma-separated)")
    ap.add_argument("--key", choices=sorted(MECHANISM), default="ec-p256")
    ap.add_argument("--series", default=DEFAULT_SERIES,
                    help=f"comma-separated: {', '.join(BUILTIN)}, PKG.MODULE:FUNCTION (default {DEFAULT_SERIES})")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--batch-size", type=int, default=256,
                    help="ocspmint-run*, ocspmint-refresh: [signing] batch_size (default 256, the config's)")
    ap.add_argument("--store-dir", type=Path,
                    help="ocspmint-run: put its state dir and file store below this folder (e.g. /dev/shm, "
                         "to take the disk out of the measurement; default: the temp folder)")
    args = ap.parse_args(argv)
    args.transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    if not args.transports or any(t not in ("p11kit", "shim") for t in args.transports):
        ap.error("--transport takes p11kit, shim or p11kit,shim")
    if args.latency_ms <= 0 or args.slots < 1 or args.processes < 1 or args.seconds <= 0 or args.batch_size < 1:
        ap.error("--latency-ms, --seconds must be > 0; --slots, --processes, --batch-size >= 1")
    return args


def main(argv: list[str] | None = None, series: dict[str, SeriesFn] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and with --json writes) the results.
    ``series`` adds named series to those given with --series."""
    args = parse_args(argv)
    missing = available()
    if missing:
        raise SystemExit(f"simulated HSM unavailable: {missing}")
    chosen: dict[str, SeriesFn] = {s: load_series(s) for s in args.series.split(",") if s.strip()}
    chosen.update(series or {})
    latency_us = round(args.latency_ms * 1000)
    capacity = args.slots * 1e6 / latency_us
    result: dict[str, Any] = {
        "benchmark": "nethsm_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "latency_ms": latency_us / 1000,
        "slots": args.slots,
        "capacity_per_second": capacity,
        "key": args.key,
        "mechanism": MECHANISM[args.key],
        "processes": args.processes,
        "seconds_per_point": args.seconds,
        "warmup_seconds": args.warmup,
        "batch_size": args.batch_size,
        "series": [],
    }
    print(f"simulated HSM: latency {latency_us / 1000:g} ms, {args.slots} slots -> capacity {capacity:,.0f}/s; "
          f"key {args.key}; {args.processes} process(es); {args.seconds:g} s per point", flush=True)
    loop = p11loop_build.build_loop()
    with tempfile.TemporaryDirectory(prefix="nethsm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        demo = build_demo(tmp / "demo", certs=1, precerts=0, revoke=0, responder_key=args.key)
        pin = demo.pin_file.read_text().strip()
        for transport in args.transports:
            work = tmp / transport
            with nethsm(work, demo.softhsm_conf, token=TOKEN_LABEL, latency_us=latency_us, slots=args.slots,
                        transport=transport, shim_dir=ROOT / "build" / "p11fault") as hsm:
                ctx = Context(demo, hsm, pin, MECHANISM[args.key], args.processes, args.seconds, args.warmup,
                              work, loop, args.store_dir, args.batch_size)
                for name, fn in chosen.items():
                    result["series"].append(run_series(name, fn, ctx, args.sessions, capacity))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def run_series(name: str, fn: SeriesFn, ctx: Context, sessions: list[int], capacity: float) -> dict[str, Any]:
    print(f"\n{name} via {ctx.hsm.transport}:\n{'sessions':>8} {'procs':>5} {'sig/s':>10} {'/capacity':>9} {'cores':>5}",
          flush=True)
    points = []
    for s in sessions:
        point = {"sessions": s, "processes": ctx.processes, **fn(ctx, s)}
        point["sessions"], point["processes"] = s, point.get("processes", ctx.processes)
        point["ratio_capacity"] = point["per_second"] / capacity
        points.append(point)
        cores = f"{point['cores']:5.2f}" if "cores" in point else f"{'-':>5}"
        print(f"{s:>8} {point['processes']:>5} {point['per_second']:>10,.0f} {point['ratio_capacity']:>9.2f} {cores}",
              flush=True)
    best = max(p["per_second"] for p in points)
    for p in points:
        p["ratio_best"] = p["per_second"] / best if best else 0.0
    print("  /best: " + "  ".join(f"{p['sessions']}:{p['ratio_best']:.2f}" for p in points), flush=True)
    return {"name": name, "transport": ctx.hsm.transport, "best_per_second": best, "points": points}


if __name__ == "__main__":
    main()
