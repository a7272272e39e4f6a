"""Publish throughput: S3 client libraries' raw PUT loops against ocspmint's S3Store.

Usage::

    .venv/bin/python bench/publish_throughput.py [--objects 20000] [--concurrency 64]
        [--repeat 3] [--libs boto3 aiobotocore obstore awscrt] [--store-lib obstore] [--markdown]

Starts one SeaweedFS (``tests/seaweed.py``: ``weed server -filer -s3`` on
127.0.0.1, auth on) for the whole run. Every measurement runs in a fresh
child process (this script with ``--child``) that gets the credentials
through the standard AWS environment variables, so a library's threads and
caches never leak into another's numbers. A child first makes ``WARMUP``
untimed PUTs (connection set-up), then times ``--objects`` PUTs of distinct
keys (the ocspmint key layout, a fresh prefix per child) with 500-byte
random bodies (a typical OCSP response), ``--concurrency`` in flight:

- raw ``boto3``: ``put_object(Bucket, Key, Body)`` from a thread pool of
  C threads sharing one client (max_pool_connections=C);
- raw ``aiobotocore``: ``put_object`` from C tasks on uvloop;
- raw ``obstore``: ``obstore.put_async`` from C tasks on uvloop;
- raw ``awscrt``: ``S3Client.make_request(PUT_OBJECT)`` with at most C
  meta-requests in flight (a semaphore released in ``on_done``);
- ``obstore+headers`` (with ``--store-lib obstore``): the raw obstore loop
  sending exactly what S3Store sends (SHA-256 checksum, Content-Type,
  Cache-Control, three metadata fields), to separate the cost of the
  headers (client and server) from S3Store's own;
- ``S3Store``: ``ocspmint.s3store.S3Store.submit`` of the same objects as
  ``PutItem`` batches of 256 (all submitted at once, then every Future
  awaited), the library being whatever S3Store uses (``--store-lib`` names
  it for the ratio).

Each library uses its defaults apart from the endpoint, path-style
addressing and the pool size, so "raw" is what a plain caller gets. Per
measurement: client CPU per PUT (``time.process_time`` of the child: all its
threads, user + system; the server is another process), PUTs/s (objects /
wall time of the timed part), and the SeaweedFS process's CPU per PUT over
the same interval (``/proc/PID/stat``). Medians over ``--repeat`` rounds; a
round runs every library once, in the order given. The S3Store ratio divides
its PUTs/s by the raw loop of its library in the same round.

Target (issue): ≤ 0.3 ms client CPU per published response and ratio
≥ 0.9. Note that SeaweedFS runs on the same cores as the client, so a
library that burns more client CPU also slows the server down.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
LIBS = ("boto3", "aiobotocore", "obstore", "awscrt")
WARMUP = 300
BODY_SIZE = 500
BATCH = 256


# ---------------------------------------------------------------- the child ---


def make_keys(prefix: str, n: int) -> list[str]:
    """``n`` distinct keys ``prefix/<shard>/<issuer id>/<serial>`` shaped like
    ocspmint.store.object_key (random issuer ids and 16-byte serials)."""
    rnd = random.Random(prefix)
    issuers = [rnd.randbytes(20).hex() for _ in range(4)]
    keys = []
    for i in range(n):
        tail = f"{issuers[i % 4]}/{rnd.randbytes(20).hex()}"
        keys.append(f"{prefix}/{tail[-2:]}/{tail}")
    return keys


def _endpoint_host(endpoint: str) -> str:
    return endpoint.split("://", 1)[1].rstrip("/")


def raw_boto3(endpoint: str, bucket: str, conc: int) -> Callable[[list[str], bytes], None]:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=conc, s3={"addressing_style": "path"}))
    pool = ThreadPoolExecutor(conc)

    def run(keys: list[str], body: bytes) -> None:
        for _ in pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=body), keys):
            pass

    return run


def _async_runner(make: Callable[[], Any], put: Callable[[Any, str, bytes], Any], conc: int,
                  close: Callable[[Any], Any] | None = None) -> Callable[[list[str], bytes], None]:
    """A blocking ``run(keys, body)`` driving ``conc`` tasks on one uvloop
    loop that lives for the child's lifetime; ``make`` builds the client."""
    import uvloop

    loop = uvloop.new_event_loop()
    client = loop.run_until_complete(make())

    async def many(keys: list[str], body: bytes) -> None:
        it = iter(keys)

        async def worker() -> None:
            for k in it:
                await put(client, k, body)

        await asyncio.gather(*(worker() for _ in range(conc)))

    def run(keys: list[str], body: bytes) -> None:
        loop.run_until_complete(many(keys, body))

    return run


def raw_aiobotocore(endpoint: str, bucket: str, conc: int) -> Callable[[list[str], bytes], None]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def make() -> Any:
        cm = get_session().create_client(
            "s3", endpoint_url=endpoint, config=AioConfig(max_pool_connections=conc, s3={"addressing_style": "path"})
        )
        return await cm.__aenter__()

    async def put(c: Any, k: str, body: bytes) -> None:
        await c.put_object(Bucket=bucket, Key=k, Body=body)

    return _async_runner(make, put, conc)


def raw_obstore(endpoint: str, bucket: str, conc: int) -> Callable[[list[str], bytes], None]:
    import obstore
    from obstore.store import S3Store as ObS3Store

    async def make() -> Any:
        return ObS3Store(bucket, endpoint=endpoint, client_options={"allow_http": True, "pool_max_idle_per_host": str(conc)})

    async def put(c: Any, k: str, body: bytes) -> None:
        await obstore.put_async(c, k, body)

    return _async_runner(make, put, conc)


def raw_obstore_headers(endpoint: str, bucket: str, conc: int) -> Callable[[list[str], bytes], None]:
    """raw obstore sending what S3Store sends: x-amz-checksum-sha256,
    Content-Type, Cache-Control and the three metadata fields."""
    import hashlib

    import obstore
    from obstore.store import S3Store as ObS3Store

    async def make() -> Any:
        return ObS3Store(bucket, endpoint=endpoint, checksum_algorithm="sha256",
                         client_options={"allow_http": True, "pool_max_idle_per_host": str(conc)})

    async def put(c: Any, k: str, body: bytes) -> None:
        await obstore.put_async(c, k, body, attributes={
            "Content-Type": "application/ocsp-response",
            "Cache-Control": "max-age=604800, public, no-transform, must-revalidate",
            "this-update": "2026-11-21T00:00:00Z", "next-update": "2026-11-28T00:00:00Z",
            "sha256": hashlib.sha256(body).hexdigest(),
        })

    return _async_runner(make, put, conc)


def raw_awscrt(endpoint: str, bucket: str, conc: int) -> Callable[[list[str], bytes], None]:
    import io

    from awscrt.auth import AwsCredentialsProvider
    from awscrt.http import HttpHeaders, HttpRequest
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
    from awscrt.s3 import S3Client, S3RequestTlsMode, S3RequestType

    elg = EventLoopGroup(1)
    bootstrap = ClientBootstrap(elg, DefaultHostResolver(elg))
    client = S3Client(
        bootstrap=bootstrap, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        tls_mode=S3RequestTlsMode.DISABLED, credential_provider=AwsCredentialsProvider.new_default_chain(bootstrap),
        max_active_connections_override=conc,
    )
    host = _endpoint_host(endpoint)

    def run(keys: list[str], body: bytes) -> None:
        sem = threading.Semaphore(conc)
        errors: list[BaseException] = []
        done = threading.Event()
        left = [len(keys)]
        lock = threading.Lock()

        def on_done(error: BaseException | None = None, **_: Any) -> None:
            if error is not None:
                errors.append(error)
            sem.release()
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        for k in keys:
            sem.acquire()
            headers = HttpHeaders([("Host", host), ("Content-Length", str(len(body)))])
            req = HttpRequest("PUT", f"/{bucket}/{k}", headers, io.BytesIO(body))
            client.make_request(type=S3RequestType.PUT_OBJECT, request=req, on_done=on_done)
        done.wait()
        if errors:
            raise RuntimeError(f"{len(errors)} awscrt PUTs failed: {errors[0]!r}")

    return run


def store_runner(endpoint: str, bucket: str, conc: int) -> Callable[[list[str], bytes], None]:
    from ocspmint.config import Store as StoreConfig
    from ocspmint.s3store import S3Store
    from ocspmint.store import PutItem

    store = S3Store(f"s3://{bucket}", StoreConfig(url=f"s3://{bucket}", endpoint=endpoint, concurrency=conc))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    this, nxt = now - dt.timedelta(hours=1), now + dt.timedelta(days=7)

    def run(keys: list[str], body: bytes) -> None:
        futures = []
        for i in range(0, len(keys), BATCH):
            futures.append(store.submit([PutItem(k, body, this, nxt) for k in keys[i:i + BATCH]]))
        bad = [e for f in futures for e in f.result() if e is not None]
        if bad:
            raise RuntimeError(f"{len(bad)} S3Store PUTs failed: {bad[0]}")

    return run


RUNNERS: dict[str, Callable[[str, str, int], Callable[[list[str], bytes], None]]] = {
    "boto3": raw_boto3, "aiobotocore": raw_aiobotocore, "obstore": raw_obstore, "awscrt": raw_awscrt,
    "obstore+headers": raw_obstore_headers, "S3Store": store_runner,
}


def child(what: str, endpoint: str, bucket: str, prefix: str, objects: int, conc: int,
          body_size: int = BODY_SIZE) -> dict[str, float]:
    """Measure one runner with random ``body_size``-byte bodies; returns
    seconds, cpu (client CPU seconds) of the timed part."""
    run = RUNNERS[what](endpoint, bucket, conc)
    body = os.urandom(body_size)
    run(make_keys(prefix + "-warmup", WARMUP), body)
    keys = make_keys(prefix, objects)
    c0, t0 = time.process_time(), time.perf_counter()
    run(keys, body)
    t1, c1 = time.perf_counter(), time.process_time()
    return {"seconds": t1 - t0, "cpu": c1 - c0}


# --------------------------------------------------------------- the parent ---


def proc_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(what: str, sw: Any, prefix: str, objects: int, conc: int, body_size: int = BODY_SIZE) -> dict[str, float]:
    """Run ``what`` in a fresh child (credentials in its environment only);
    the child's result plus server_cpu, SeaweedFS CPU seconds over its life."""
    env = {**os.environ, **sw.env(), "PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, __file__, "--child", what, "--endpoint", sw.endpoint, "--bucket", sw.bucket,
            "--prefix", prefix, "--objects", str(objects), "--concurrency", str(conc), "--body-size", str(body_size)]
    s0 = proc_cpu(sw.pid)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    s1 = proc_cpu(sw.pid)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # server CPU covers the child's warmup and start too: an upper bound
    r["server_cpu"] = s1 - s0
    return r


def machine_facts() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import importlib.metadata as md

    def v(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    weed = subprocess.run([_weed(), "version"], capture_output=True, text=True, check=False).stdout.strip().splitlines()[0]
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}; "
            f"SeaweedFS `{weed}`; boto3 {v('boto3')}, aiobotocore {v('aiobotocore')}, uvloop {v('uvloop')}, "
            f"obstore {v('obstore')}, awscrt {v('awscrt')}")


def _weed() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from seaweed import weed_binary

    return weed_binary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    ap.add_argument("--store-lib", default="obstore", choices=LIBS, help="the library S3Store uses (for the ratio)")
    ap.add_argument("--no-store", action="store_true", help="raw loops only")
    ap.add_argument("--markdown", action="store_true", help=f"append a dated section to {RESULTS}")
    ap.add_argument("--child", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--body-size", type=int, default=BODY_SIZE, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.endpoint, a.bucket, a.prefix, a.objects, a.concurrency, a.body_size)))
        return

    import importlib.util

    missing = [m for m in {*a.libs, a.store_lib} if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"not installed: {', '.join(sorted(missing))}; run .venv/bin/pip install -e '.[test,bench]'")
    sys.path.insert(0, str(ROOT / "tests"))
    from seaweed import seaweed

    whats = list(a.libs)
    if not a.no_store:
        if a.store_lib not in whats:
            whats.insert(0, a.store_lib)
        whats += ["obstore+headers", "S3Store"] if a.store_lib == "obstore" else ["S3Store"]
    rows: dict[str, list[dict[str, float]]] = {w: [] for w in whats}
    ratios: list[float] = []
    ratios_headers: list[float] = []
    print(f"{a.objects} objects of {BODY_SIZE} B, concurrency {a.concurrency}, {a.repeat} rounds", flush=True)
    with seaweed(bucket="bench") as sw:
        for rnd in range(a.repeat):
            for w in whats:
                r = measure(w, sw, f"r{rnd}-{w}", a.objects, a.concurrency)
                rows[w].append(r)
                print(f"round {rnd + 1} {w:12s} {a.objects / r['seconds']:8.0f} PUT/s  client "
                      f"{1000 * r['cpu'] / a.objects:.3f} ms/PUT  server {1000 * r['server_cpu'] / (a.objects + WARMUP):.3f} ms/PUT",
                      flush=True)
            if not a.no_store:
                s, raw = rows["S3Store"][-1], rows[a.store_lib][-1]
                ratios.append(raw["seconds"] / s["seconds"])
                if "obstore+headers" in rows:
                    ratios_headers.append(rows["obstore+headers"][-1]["seconds"] / s["seconds"])
    table = _table(rows, ratios, ratios_headers, a)
    print()
    print(table)
    if a.markdown:
        _append_markdown(table, a)


def _range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})" if xs else ""


def _table(rows: dict[str, list[dict[str, float]]], ratios: list[float], ratios_headers: list[float],
           a: argparse.Namespace) -> str:
    n = a.objects
    header = ("| what | PUTs/s (median, min–max) | client CPU ms/PUT (median) | server CPU ms/PUT (median) "
              "| S3Store ratio to it (median, min–max) |")
    lines = [header, "|---|---:|---:|---:|---:|"]
    for w, rs in rows.items():
        rates = [n / r["seconds"] for r in rs]
        cpu = statistics.median(1000 * r["cpu"] / n for r in rs)
        scpu = statistics.median(1000 * r["server_cpu"] / (n + WARMUP) for r in rs)
        name = f"raw {w}" if w != "S3Store" else f"S3Store.submit ({a.store_lib})"
        ratio = _range(ratios) if w == a.store_lib else _range(ratios_headers) if w == "obstore+headers" else ""
        lines.append(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | "
                     f"{cpu:.3f} | {scpu:.3f} | {ratio} |")
    return "\n".join(lines)


def _append_markdown(table: str, a: argparse.Namespace) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    heading = "# Publish throughput results"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\nReproduce: `.venv/bin/python bench/publish_throughput.py --markdown` " \
            "(options `--objects N --concurrency C --repeat R --libs ... --store-lib LIB`).\n"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        rev = "?"
    today = dt.date.today().isoformat()
    section = (f"\n## Run of {today} (src at {rev} + working tree; {a.objects:,} objects of {BODY_SIZE} B, "
               f"concurrency {a.concurrency}, medians of {a.repeat})\n\n"
               f"Machine: {machine_facts()}. SeaweedFS (`weed server -filer -s3`, one process) runs on the same "
               "cores as the client and competes with it for CPU: client CPU per PUT is the fairer "
               "comparison, PUTs/s is bounded by the server here.\n\n" + table + "\n")
    RESULTS.write_text(text.rstrip("\n") + "\n" + section)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
