"""Signing throughput of ``ocspmint run`` against the raw PKCS#11 ceiling.

Usage::

    .venv/bin/python bench/sign_throughput.py [--serials 50000] [--workers 1 2]
        [--key ec-p256|ec-p384|rsa-2048] [--repeat 3] [--store-dir DIR] [--drop-stores] [--busy-ceiling]
        [--resign] [--markdown]

In a temp folder: ``build_demo`` (SoftHSM2 token + openssl CA), a synthetic
SQLite ledger of ``--serials`` entries for issuer "issuing-ca" (random
16-byte serials, ~5 % revoked with a reason, ~30 % precertificates, notAfter
90 days ahead). Then, for each worker count N, in this order:

(a) ceiling: N spawned processes each log in to the demo token, find the
    responder key, wait on a barrier, and run a bare python-pkcs11 loop
    (``key.sign(sha256 digest, mechanism=ECDSA)``; RSA: SHA256_RSA_PKCS over
    150 bytes) for serials/N signatures. Rate = serials / (last finish −
    barrier).
(b) ``ocspmint run --json --quiet`` as a subprocess into a fresh state dir
    and store, with ``verify = false`` then ``verify = true``. Two rates:
    serials / whole command wall time (interpreter start, ledger read,
    worker spawn + login included) and the summary's own ``per_second``.
    State dirs and stores go to the temp folder, or below ``--store-dir``
    (e.g. /dev/shm, to take the disk out of the measurement). With
    ``--drop-stores`` each run's state dir and store are deleted once it is
    measured: on this VM, runs into a tmpfs already holding the earlier
    runs' stores (200+ MB each) were up to 12 % slower (bench/RESULTS.md).

(c) with ``--resign``: after each (b), ``ocspmint run`` again with a fresh
    state dir over the store (b) just filled: every response is signed
    again and replaces the file there (the incident case, a population
    re-signed), which costs the file system more than creating files
    (docs/store-layout.md). Same two rates as (b). On ext4 without a
    journal, the (b) runs after a (c) create files just after it freed
    50,000: keep their numbers from a run without ``--resign``.

(a') with ``--busy-ceiling``: the ceiling again while (cores − N) processes
    spin on the other cores, as the run's parent process keeps them busy in
    (b): on this VM a busy neighbour core slows the token's signing itself.
    Its row's ratio is to (a); the (b) rows keep their ratio to (a).

(a), (b) off, (b) on are repeated ``--repeat`` times per N; the table gives
medians, the min–max of the rates, and the median over repetitions of each
(b) rate divided by the (a) ceiling of the same repetition (same run, same
token, same N). The benchmark fails (exit 1) unless each run's summary
is ok with published == serials. ``--markdown`` appends a dated section to
bench/RESULTS.md. SOFTHSM2_CONF is set only in child processes. On a disk
store leave a minute between runs: mass deletions (this script's cleanup)
slow the next file creations on ext4 without a journal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Lock
from pathlib import Path
from typing import Any

from ocspmint.demo import RESPONDER_KEYS, RESPONDER_LABEL, SOFTHSM_MODULE, TOKEN_LABEL, Demo, build_demo
from ocspmint.ledger.sqlite import write_entries
from ocspmint.model import Kind, LedgerEntry, Reason, Status, utc_now

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ISSUER = "issuing-ca"
WARMUP = 200  # untimed signatures per ceiling process before the barrier
REASONS = (Reason.keyCompromise, Reason.superseded, Reason.cessationOfOperation, Reason.affiliationChanged, None)


@dataclass
class Row:
    """One measurement over the repetitions; ``ceilings[i]`` is the ceiling
    measured in the same repetition as ``rates[i]``."""

    workers: int
    what: str
    seconds: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    ceilings: list[float] = field(default_factory=list)

    def add(self, seconds: float, rate: float, ceiling: float) -> None:
        self.seconds.append(seconds)
        self.rates.append(rate)
        self.ceilings.append(ceiling)

    @property
    def ratio(self) -> float:
        """Median over repetitions of rate / same-repetition ceiling."""
        return statistics.median(r / c for r, c in zip(self.rates, self.ceilings))


# ---------------------------------------------------------------- setup


def synthetic_entries(n: int, seed: int = 1) -> Iterator[LedgerEntry]:
    """``n`` unique random 16-byte serials: ~5 % revoked, ~30 % precertificates."""
    rng = random.Random(seed)
    now = utc_now()
    seen: set[int] = set()
    while len(seen) < n:
        serial = rng.getrandbits(128)
        if not serial or serial in seen:
            continue
        seen.add(serial)
        kind = Kind.PRECERTIFICATE if rng.random() < 0.30 else Kind.CERTIFICATE
        common = dict(issuer=ISSUER, serial=serial, kind=kind, not_after=now + dt.timedelta(days=90), source="synthetic")
        if rng.random() < 0.05:
            revoked = now - dt.timedelta(seconds=rng.randrange(1, 30 * 86400))
            yield LedgerEntry(**common, status=Status.REVOKED, revoked_at=revoked, reason=rng.choice(REASONS))
        else:
            yield LedgerEntry(**common, status=Status.GOOD)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list) and all(not isinstance(x, dict) for x in v):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml(d: dict[str, object], prefix: str = "") -> list[str]:
    """Minimal TOML writer for the config shape (tables, arrays of tables, scalars)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            lines += ["", f"[{name}]", *_toml(v, name + ".")]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += ["", f"[[{name}]]", *_toml(item, name + ".")]
    return lines


def write_config(demo: Demo, ledger: Path, run_dir: Path, workers: int, verify: bool, store: Path | None = None) -> Path:
    """The demo config with one sqlite source, a fresh state dir and store
    (or ``store``, an existing one), N workers."""
    cfg = tomllib.loads(demo.config.read_text())
    for issuer in cfg["issuers"]:  # absolute paths: the config moves to run_dir
        issuer["cert"] = str(demo.root / issuer["cert"])
        for key in ("cert", "pin_file"):
            if issuer["signer"].get(key):
                issuer["signer"][key] = str(demo.root / issuer["signer"][key])
    cfg["state_dir"] = str(run_dir / "state")
    cfg["store"] = {"url": f"file:{store or run_dir / 'responses'}"}
    cfg["signing"] = {**cfg.get("signing", {}), "workers": workers, "verify": verify}
    cfg["sources"] = [{"type": "sqlite", "path": str(ledger)}]
    run_dir.mkdir(parents=True)
    path = run_dir / "ocspmint.toml"
    path.write_text("\n".join(_toml(cfg)) + "\n")
    return path


# ---------------------------------------------------------------- (a) ceiling


def _ceiling_worker(softhsm_conf: str, pin_file: str, key_type: str, count: int, seed: int,
                    login: Lock, barrier: Barrier, out: Queue[tuple[float, float]]) -> None:
    os.environ["SOFTHSM2_CONF"] = softhsm_conf  # this child only; read at C_Initialize
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.types import SignMixin

    # One login at a time, as SignerPool starts its workers one by one: SoftHSM2's
    # file token fails C_GetTokenInfo (CKR_GENERAL_ERROR) when another process logs in.
    with login:
        session = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label=TOKEN_LABEL).open(
            user_pin=Path(pin_file).read_text().strip())
    with session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=RESPONDER_LABEL)
        assert isinstance(key, SignMixin)
        rng = random.Random(seed)
        if key_type.startswith("ec-"):
            mech = Mechanism.ECDSA
            data = [hashlib.sha256(rng.randbytes(150)).digest() for _ in range(count)]
        else:
            mech = Mechanism.SHA256_RSA_PKCS
            data = [rng.randbytes(150) for _ in range(count)]
        for d in data[:WARMUP]:  # first-use costs (key object, caches) stay out of the timing
            key.sign(d, mechanism=mech)
        barrier.wait(timeout=600)
        start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        for d in data:
            key.sign(d, mechanism=mech)
        out.put((start, time.perf_counter()))


def busy_ceiling(demo: Demo, key_type: str, serials: int, workers: int) -> float | None:
    """``ceiling`` while (cores − ``workers``) busy-loop processes keep the
    other cores busy; None when no core is left over."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range((os.cpu_count() or 1) - workers)]
    try:
        return ceiling(demo, key_type, serials, workers) if spinners else None
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def ceiling(demo: Demo, key_type: str, serials: int, workers: int) -> float:
    """Raw python-pkcs11 signing rate of ``workers`` processes (signatures/s)."""
    ctx = mp.get_context("spawn")
    login, barrier, out = ctx.Lock(), ctx.Barrier(workers), ctx.Queue()
    shares = [serials // workers + (i < serials % workers) for i in range(workers)]
    procs = [ctx.Process(target=_ceiling_worker, args=(str(demo.softhsm_conf), str(demo.pin_file), key_type,
                                                        n, i, login, barrier, out)) for i, n in enumerate(shares)]
    for p in procs:
        p.start()
    times: list[tuple[float, float]] = []
    while len(times) < workers:
        try:
            times.append(out.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode for p in procs):  # a worker died: the others would wait at the barrier
                for p in procs:
                    p.kill()
                raise SystemExit("ceiling worker failed (traceback above)") from None
    for p in procs:
        p.join()
    return serials / (max(t[1] for t in times) - min(t[0] for t in times))


# ---------------------------------------------------------------- (b) ocspmint run


def ocspmint_run(demo: Demo, config: Path, serials: int) -> tuple[float, dict[str, Any]]:
    """Run ``ocspmint run`` as a subprocess; (wall seconds, JSON summary)."""
    exe = Path(sys.executable).parent / "ocspmint"
    env = {**os.environ, "SOFTHSM2_CONF": str(demo.softhsm_conf)}
    start = time.perf_counter()
    p = subprocess.run([str(exe), "run", "--config", str(config), "--json", "--quiet"], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - start
    return wall, checked_summary(p, serials)


def checked_summary(p: subprocess.CompletedProcess[str], serials: int) -> dict[str, Any]:
    """The JSON summary of a finished ``ocspmint run --json`` (text output);
    exits with status 1, showing the failures, unless it is ok with
    published == serials."""
    try:
        summary = json.loads(p.stdout)
    except json.JSONDecodeError:
        summary = {}
    if p.returncode != 0 or not summary.get("ok") or summary.get("published") != serials:
        raise SystemExit(f"ocspmint run FAILED (exit {p.returncode}, ok={summary.get('ok')}, "
                         f"published={summary.get('published')} of {serials}; failures: "
                         f"{summary.get('failures', [])[:3]})\n{p.stderr[-2000:]}")
    return summary


# ---------------------------------------------------------------- report


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")))

    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            return "?"

    from cryptography.hazmat.backends.openssl import backend

    return {
        "CPU": model,
        "cores": str(os.cpu_count()),
        "RAM": f"{mem_kb / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "OpenSSL": f"{cmd('openssl', 'version')} (system, SoftHSM2's); {backend.openssl_version_text()} (cryptography, verifier)",
        "SoftHSM2": cmd("dpkg-query", "-W", "-f", "${Version}", "softhsm2"),
    }


def table(rows: list[Row]) -> str:
    med = statistics.median
    head = ("| workers | measurement | seconds (median) | signatures/s (median) | min–max | ratio to ceiling (median) |\n"
            "|---:|---|---:|---:|---:|---:|")
    body = [f"| {r.workers} | {r.what} | {med(r.seconds):.2f} | {med(r.rates):,.0f} | "
            f"{min(r.rates):,.0f}–{max(r.rates):,.0f} | {r.ratio:.3f} |" for r in rows]
    return "\n".join([head, *body])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serials", type=int, default=50_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--key", choices=RESPONDER_KEYS, default="ec-p256")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of (a)+(b) per worker count; medians reported")
    ap.add_argument("--store-dir", type=Path, help="parent folder of the per-run state dirs and stores (default: the temp folder)")
    ap.add_argument("--busy-ceiling", action="store_true", help="(a'): the ceiling again with the other cores busy")
    ap.add_argument("--drop-stores", action="store_true",
                    help="delete each run's state dir and store once measured (a tmpfs --store-dir then holds one at a time)")
    ap.add_argument("--resign", action="store_true", help="(c): after each (b), re-sign everything over its store")
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args()

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ocspmint-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="ocspmint-bench-runs-", dir=args.store_dir or tmp) as runs:
        root = Path(tmp)
        demo = build_demo(root / "demo", certs=1, precerts=1, revoke=0, responder_key=args.key)
        ledger = root / "ledger.sqlite"
        write_entries(str(ledger), synthetic_entries(args.serials))
        for n in args.workers:
            ceil_row = Row(n, "(a) ceiling: raw python-pkcs11 sign loop")
            busy_row = Row(n, "(a') the same, the other cores kept busy")
            runs_rows = {(v, k, again): Row(n, f"({'c' if again else 'b'}) ocspmint run verify={'on' if v else 'off'}"
                                               f"{', re-signing over the same store' if again else ''}, {k}")
                         for v in (False, True) for again in ((False, True) if args.resign else (False,))
                         for k in ("command wall", "summary per_second")}
            rows += [ceil_row, *([busy_row] if args.busy_ceiling and n < (os.cpu_count() or 1) else []),
                     *runs_rows.values()]
            for rep in range(args.repeat):
                ceil = ceiling(demo, args.key, args.serials, n)
                ceil_row.add(args.serials / ceil, ceil, ceil)
                print(f"workers {n} #{rep + 1}: ceiling {ceil:,.0f}/s", file=sys.stderr)
                if args.busy_ceiling and (busy := busy_ceiling(demo, args.key, args.serials, n)) is not None:
                    busy_row.add(args.serials / busy, busy, ceil)
                    print(f"workers {n} #{rep + 1}: ceiling, other cores busy {busy:,.0f}/s", file=sys.stderr)
                for verify in (False, True):
                    name = f"run-{n}-{'verify' if verify else 'noverify'}-{rep}"
                    for again in (False, True) if args.resign else (False,):
                        store = Path(runs) / name / "responses" if again else None
                        config = write_config(demo, ledger, Path(runs) / (name + "-again" * again), n, verify, store)
                        wall, s = ocspmint_run(demo, config, args.serials)
                        runs_rows[verify, "command wall", again].add(wall, args.serials / wall, ceil)
                        runs_rows[verify, "summary per_second", again].add(s["seconds"], s["per_second"], ceil)
                        print(f"workers {n} #{rep + 1}: verify={verify}{' re-sign' * again}: wall {wall:.2f}s, "
                              f"summary {s['per_second']}/s", file=sys.stderr)
                    if args.drop_stores:
                        for folder in Path(runs).iterdir():
                            shutil.rmtree(folder)

    where = f"stores in {args.store_dir}" if args.store_dir else "stores in the temp folder"
    params = (f"{args.serials:,} serials, key {args.key}, workers {' '.join(map(str, args.workers))}, "
              f"{args.repeat} repetitions, {where}")
    print(f"\n{params}\n{table(rows)}", flush=True)
    if args.markdown:
        append_results("bench/sign_throughput.py", sys.argv[1:], params, table(rows))
    return 0


def append_results(script: str, argv: list[str], params: str, body: str) -> None:
    """Append a dated section (parameters, command line, machine, ``body``) to bench/RESULTS.md."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = "\n".join(f"- {k}: {v}" for k, v in machine().items())
    cmdline = " ".join([script, *argv])
    with RESULTS.open("a") as f:
        f.write(f"\n### {now}: {params}\n\n`{cmdline}`\n\n{info}\n\n{body}\n")


if __name__ == "__main__":
    sys.exit(main())
