"""End to end to S3: ``ocspmint run`` into SeaweedFS against the raw PUT ceiling.

Usage::

    .venv/bin/python bench/s3_end_to_end.py [--serials 20000] [--workers 1]
        [--key ec-p256|ec-p384|rsa-2048] [--concurrency 64] [--verify off on]
        [--repeat 3] [--markdown]

In a temp folder: ``build_demo`` (SoftHSM2 token + openssl CA) and the
synthetic SQLite ledger of ``bench/sign_throughput.py`` (``--serials``
entries, random 16-byte serials, ~5 % revoked, ~30 % precertificates). An
untimed probe, ``ocspmint run`` of the ledger's first ``PROBE`` entries
into a file store, gives the mean size of a response; the ceiling's bodies
have that size. Then one SeaweedFS (``tests/seaweed.py``: ``weed server
-filer -s3`` on 127.0.0.1, auth on, bucket ``bench``) serves the whole run,
and each repetition measures, in this order:

(a) the ceiling, through ``bench/publish_throughput.py``'s child processes
    (``measure``): the raw obstore PUT loop (obstore is S3Store's library),
    bare, then ``obstore+headers`` (the same loop sending exactly S3Store's
    headers: SHA-256 checksum, Content-Type, Cache-Control, three metadata
    fields). Each child makes ``WARMUP`` untimed PUTs, then times
    ``--serials`` PUTs of distinct keys with ``--concurrency`` in flight.
    Rate = serials / timed seconds.
(b) ``ocspmint run --json --quiet`` as a subprocess, ledger → sign
    (SoftHSM2, ``--workers`` processes) → verify (for each of ``--verify``)
    → S3Store (``[store] concurrency = --concurrency``, a fresh prefix of
    the same bucket) → journal (a fresh state dir). Two rates: serials /
    command wall time (interpreter start, ledger read, worker spawn and
    login, store close included) and the summary's own ``per_second``.

Ratio: for each (b) rate and each ceiling, (b) rate / (a) rate of the same
repetition; the table gives the median over ``--repeat`` repetitions, with
the medians and min–max of the rates. CPU per object: client = the timed
part of the (a) child (``time.process_time``), the whole (b) command with
its signer workers (``RUSAGE_CHILDREN``); SeaweedFS = its process's CPU
(``/proc/PID/stat``) over the (a) child's life divided by serials +
WARMUP, over the (b) command divided by serials. Client and server share
the machine's cores, so server CPU is part of every rate. The benchmark
fails (exit 1) unless each (a) child succeeds and each (b) summary is ok
with published == serials. Credentials reach the children only through
the AWS environment variables, never argv or the config file.
``--markdown`` appends a dated section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]
from publish_throughput import WARMUP, measure, proc_cpu  # noqa: E402
from seaweed import SeaweedS3, seaweed, weed_binary  # noqa: E402
from sign_throughput import _toml, append_results, checked_summary, ocspmint_run, synthetic_entries, write_config  # noqa: E402

from ocspmint.demo import RESPONDER_KEYS, Demo, build_demo  # noqa: E402
from ocspmint.ledger.sqlite import write_entries  # noqa: E402

BIN = Path(sys.executable).parent
CEILINGS = ("obstore", "obstore+headers")  # publish_throughput.RUNNERS names
PROBE = 256  # ledger entries of the untimed probe run that sizes the ceiling's bodies


@dataclass
class Row:
    """One table line over the repetitions; ``ratios[c][i]`` is ``rates[i]``
    divided by ceiling ``c`` of the same repetition."""

    what: str
    seconds: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    client_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    ratios: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CEILINGS})

    def add(self, seconds: float, rate: float, client_ms: float, server_ms: float, ceilings: dict[str, float]) -> None:
        self.seconds.append(seconds)
        self.rates.append(rate)
        self.client_ms.append(client_ms)
        self.server_ms.append(server_ms)
        for c, ceiling in ceilings.items():
            self.ratios[c].append(rate / ceiling)


def response_size(demo: Demo, ledger: Path, run_dir: Path, workers: int) -> int:
    """Mean size in bytes of the responses ``ocspmint run`` makes (file
    store, untimed) for the first PROBE synthetic entries, written to
    ``ledger``: the benchmark ledger's first entries."""
    write_entries(str(ledger), synthetic_entries(PROBE))
    ocspmint_run(demo, write_config(demo, ledger, run_dir, workers, verify=False), PROBE)
    sizes = [p.stat().st_size for p in (run_dir / "responses").rglob("*") if p.is_file() and ".tmp" not in p.parts]
    return round(statistics.mean(sizes))


def s3_config(demo: Demo, ledger: Path, run_dir: Path, workers: int, verify: bool, sw: SeaweedS3,
              prefix: str, concurrency: int) -> Path:
    """sign_throughput's config (fresh state dir, N workers, verify) with the
    store at ``s3://BUCKET/prefix`` on SeaweedFS; no credentials in it."""
    path = write_config(demo, ledger, run_dir, workers, verify)
    cfg = tomllib.loads(path.read_text())
    cfg["store"] = {"url": f"s3://{sw.bucket}/{prefix}", "endpoint": sw.endpoint, "region": sw.region,
                    "concurrency": concurrency}
    path.write_text("\n".join(_toml(cfg)) + "\n")
    return path


def s3_run(demo: Demo, config: Path, sw: SeaweedS3, serials: int) -> tuple[float, dict[str, Any], float, float]:
    """``ocspmint run --json --quiet`` with SOFTHSM2_CONF and the S3
    credentials in its environment; (wall seconds, summary, client CPU
    seconds of the command and its workers, SeaweedFS CPU seconds). Exits
    with status 1 unless the summary is ok with published == serials."""
    argv = [str(BIN / "ocspmint"), "run", "--config", str(config), "--json", "--quiet"]
    env = {**demo.env(), **sw.env()}
    u0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu(sw.pid)
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - t0
    u1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), proc_cpu(sw.pid)
    summary = checked_summary(p, serials)
    client = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
    return wall, summary, client, s1 - s0


def table(rows: list[Row]) -> str:
    med = statistics.median
    head = ("| measurement | seconds (median) | responses/s (median) | min–max | client CPU ms/object (median) "
            "| SeaweedFS CPU ms/object (median) | ratio to raw obstore (median) | ratio to obstore+headers (median) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r.what} | {med(r.seconds):.2f} | {med(r.rates):,.0f} | {min(r.rates):,.0f}–{max(r.rates):,.0f} | "
            f"{med(r.client_ms):.3f} | {med(r.server_ms):.3f} | "
            + " | ".join(f"{med(r.ratios[c]):.3f}" for c in CEILINGS) + " |" for r in rows]
    return "\n".join([head, *body])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serials", type=int, default=20_000, help="ledger entries = objects of each measurement")
    ap.add_argument("--workers", type=int, default=1, help="signer processes of ocspmint run")
    ap.add_argument("--key", choices=RESPONDER_KEYS, default="ec-p256")
    ap.add_argument("--concurrency", type=int, default=64, help="PUTs in flight: raw loops and [store] concurrency")
    ap.add_argument("--verify", nargs="+", choices=("off", "on"), default=["off", "on"],
                    help="ocspmint run's [signing] verify settings, each measured")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of (a) then (b); medians reported")
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args()
    n = args.serials

    ceil_rows = {c: Row(f"(a) ceiling: raw {c} PUT loop") for c in CEILINGS}
    run_rows = {(v, k): Row(f"(b) ocspmint run verify={v}, {k}") for v in args.verify
                for k in ("command wall", "summary per_second")}
    with tempfile.TemporaryDirectory(prefix="ocspmint-s3e2e-") as tmp:
        root = Path(tmp)
        demo = build_demo(root / "demo", certs=1, precerts=1, revoke=0, responder_key=args.key)
        body = response_size(demo, root / "probe.sqlite", root / "probe", args.workers)
        ledger = root / "ledger.sqlite"
        write_entries(str(ledger), synthetic_entries(n))
        print(f"{n:,} serials, responses of {body} B on average (the ceiling's body size)", file=sys.stderr)
        with seaweed(root / "seaweed", bucket="bench") as sw:
            for rep in range(args.repeat):
                results = {c: measure(c, sw, f"r{rep}-{c}", n, args.concurrency, body) for c in CEILINGS}
                ceilings = {c: n / r["seconds"] for c, r in results.items()}
                for c, r in results.items():
                    ceil_rows[c].add(r["seconds"], ceilings[c], 1000 * r["cpu"] / n,
                                     1000 * r["server_cpu"] / (n + WARMUP), ceilings)
                    print(f"#{rep + 1}: raw {c}: {ceilings[c]:,.0f}/s", file=sys.stderr)
                for v in args.verify:
                    name = f"r{rep}-verify-{v}"
                    config = s3_config(demo, ledger, root / "runs" / name, args.workers, v == "on", sw,
                                       f"e2e-{name}", args.concurrency)
                    wall, s, client, server = s3_run(demo, config, sw, n)
                    cpu = (1000 * client / n, 1000 * server / n)
                    run_rows[v, "command wall"].add(wall, n / wall, *cpu, ceilings)
                    run_rows[v, "summary per_second"].add(s["seconds"], s["per_second"], *cpu, ceilings)
                    print(f"#{rep + 1}: verify={v}: wall {wall:.2f}s ({n / wall:,.0f}/s), summary {s['per_second']:,.0f}/s, "
                          f"SeaweedFS {1000 * server / n:.3f} ms/object", file=sys.stderr)

    weed = subprocess.run([weed_binary(), "version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    params = (f"S3 end to end, {n:,} serials, key {args.key}, workers {args.workers}, S3 concurrency "
              f"{args.concurrency}, ceiling bodies {body} B, {args.repeat} repetitions; SeaweedFS `{weed.strip()}`, "
              f"obstore {importlib.metadata.version('obstore')}")
    rows = [*ceil_rows.values(), *run_rows.values()]
    print(f"\n{params}\n{table(rows)}", flush=True)
    if args.markdown:
        append_results("bench/s3_end_to_end.py", sys.argv[1:], params, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
