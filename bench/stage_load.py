"""Load generators for ocspmint's signing stage, shared by
bench/sign_stage.py and bench/nethsm_throughput.py (series
``ocspmint-native`` and ``ocspmint-pool``).

- ``run_pool``: a ``SignerPool`` in this process, kept full (``has_capacity``
  / ``submit`` / ``collect``) with ``SignBatch`` messages of the same
  pre-built TBS list. After ``warmup`` seconds, the signatures of the
  replies that arrive within the next ``seconds`` count: batches running
  at the window's start count whole, those running at its end not at all,
  which evens out (as the C loop counts signatures finished in its
  window). If no reply arrives in the window, it stretches to the first
  one. Use windows of several batches per worker. The workers are spawned
  with ``env`` added to their environment (this process never loads a
  PKCS#11 module).
- ``run_native``: ``processes`` fresh interpreters, each with one
  ``ocspmint._p11native.Signer(sessions=S)``, calling ``sign_batch`` on
  ``batch`` pre-hashed items in a loop. They log in one after the other,
  start together (a "go" line on their stdin), warm up for ``warmup``
  seconds and sign whole batches for ``seconds``; rate = signatures of
  all / (last end - first start). The PIN travels in an environment
  variable, never in argv.

Run as a script it is the ``run_native`` child (not for direct use).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BATCH = 256  # the pipeline's batch size (signatures per SignBatch)


@contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` in os.environ for the block (spawned children copy it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def response_data(config: Path, issuer: str, n: int, seed: int = 1) -> tuple[Any, list[bytes]]:
    """(KeySpec, ``n`` real ResponseData DER: good, one SHA-1 CertID) for
    ``issuer`` of the ocspmint config ``config``."""
    import datetime as dt
    import random

    from ocspmint.config import load_config
    from ocspmint.encoder import ResponseTemplate, Times
    from ocspmint.issuer import load_issuers
    from ocspmint.model import Kind, LedgerEntry, Status
    from ocspmint.signer import key_spec

    ident = load_issuers(load_config(config))[issuer]
    template = ResponseTemplate(ident, ("sha1",))
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    fields = template.time_fields(Times(now, now - dt.timedelta(hours=1), now + dt.timedelta(days=6)))
    rng = random.Random(seed)
    tbs = [template.tbs(LedgerEntry(issuer, rng.getrandbits(127) | 1 << 126, Kind.CERTIFICATE,
                                    now + dt.timedelta(days=90), Status.GOOD), fields) for _ in range(n)]
    return key_spec(ident), tbs


def run_pool(specs: list[Any], issuer: str, tbs: list[bytes], *, workers: int, backend: str, sessions: int = 1,
             seconds: float = 3.0, warmup: float = 0.5, env: dict[str, str] | None = None,
             retries: int = 3, timeout: float = 60.0) -> dict[str, Any]:
    """Signatures/s of a full SignerPool (see the module docstring)."""
    from ocspmint.signer import Failed, SignBatch, SignerPool, Signed

    with patched_env(env or {}):
        pool = SignerPool(specs, workers, retries, timeout, backend, sessions)
        pool.__enter__()  # spawns (and logs in) the workers, one by one
    try:
        used = sorted(set(pool.backends.values()))
        if used != [backend]:
            raise RuntimeError(f"SignerPool backend {backend!r} asked, workers use {used}")
        batch_id = 0
        t0 = time.monotonic() + warmup
        end = t0 + seconds
        last = None  # arrival of the last counted reply (only used when the window had none)
        counted = 0
        while True:
            if time.monotonic() < end or not counted:
                while pool.has_capacity():
                    pool.submit(SignBatch(batch_id, issuer, tbs))
                    batch_id += 1
            elif not pool.busy():
                break
            for reply in pool.collect(timeout=1.0):
                t = time.monotonic()
                if isinstance(reply, Failed):
                    raise RuntimeError(f"SignerPool batch failed: {reply.error}")
                assert isinstance(reply, Signed) and len(reply.signatures) == len(tbs)
                if t0 <= t <= end or (t > end and not counted):
                    counted += len(reply.signatures)
                    last = t
        window = seconds if last is None or last <= end else last - t0
        return {"signatures": counted, "seconds": window, "per_second": counted / window,
                "workers": workers, "sessions": sessions, "backend": backend, "batch": len(tbs),
                "restarts": pool.restarts}
    finally:
        pool.close()


def run_native(module: str, token: str, key: str, mechanism: str, *, sessions: int, processes: int = 1,
               pin: str, env: dict[str, str], seconds: float = 2.0, warmup: float = 0.3,
               batch: int = BATCH, timeout: float = 120.0) -> dict[str, Any]:
    """Signatures/s of ``processes`` x ``_p11native.Signer(sessions=S)``
    (``mechanism``: "ecdsa" or "rsa-sha256", as p11_sign_loop names them),
    each keeping the next batch ``submit``ted behind the one it waits for,
    as a signer worker does (``signer.PIPELINE``)."""
    pin_var = "OCSPMINT_BENCH_PIN"
    args = json.dumps({"module": module, "token": token, "key": key, "mechanism": mechanism, "sessions": sessions,
                       "pin_env": pin_var, "seconds": seconds, "warmup": warmup, "batch": batch})
    child_env = {**os.environ, **env, pin_var: pin}
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(processes):  # log in one at a time (SoftHSM2's file token dislikes concurrent logins)
            p = subprocess.Popen([sys.executable, __file__, args], env=child_env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"native signer child failed at start: {line} {p.communicate(timeout=10)[1][-2000:]}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout + seconds + warmup)
            if p.returncode != 0:
                raise RuntimeError(f"native signer child failed (exit {p.returncode}): {err.strip()[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    total = sum(r["signatures"] for r in results)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"signatures": total, "seconds": elapsed, "per_second": total / elapsed, "processes": processes,
            "sessions": sessions, "batch": batch}


def _child(args: dict[str, Any]) -> None:
    import hashlib

    from ocspmint import _p11native as native

    module = native.Module(args["module"])
    signer = native.Signer(module, token_label=args["token"], pin=os.environ[args["pin_env"]].encode(),
                           key_label=args["key"], sessions=args["sessions"])
    if args["mechanism"] == "ecdsa":
        mech = native.CKM_ECDSA
        items = [hashlib.sha256(b"item %d" % i).digest() for i in range(args["batch"])]
    else:
        mech = native.CKM_SHA256_RSA_PKCS
        items = [os.urandom(150) for _ in range(args["batch"])]

    queued = deque([signer.submit(items, mech)])

    def sign() -> None:
        queued.append(signer.submit(items, mech))
        bad = [r for r in queued.popleft().wait() if not isinstance(r, bytes)]
        if bad:
            rv = bad[0]
            raise SystemExit(f"sign_batch: {len(bad)} of {len(items)} not signed, first: "
                             f"{native.ckr_name(rv) if isinstance(rv, int) else rv}")

    print("ready", flush=True)
    sys.stdin.readline()
    warm_end = time.monotonic() + args["warmup"]
    sign()
    while time.monotonic() < warm_end:
        sign()
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
    n = 0
    while time.monotonic() < start + args["seconds"]:
        sign()
        n += len(items)
    queued.popleft().wait()
    end = time.monotonic()
    n += len(items)
    signer.close()
    module.close()
    print(json.dumps({"start": start, "end": end, "signatures": n}), flush=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
