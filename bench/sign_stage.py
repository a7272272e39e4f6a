"""The signing stage alone (no ledger, no store) against the raw C PKCS#11 ceiling.

Usage::

    .venv/bin/python bench/sign_stage.py [--keys ec-p256 rsa-2048] [--workers 1 2]
        [--repeat 3] [--seconds 3] [--warmup 0.5] [--batch 256] [--json FILE] [--markdown]

For each key type, a demo (``build_demo``: SoftHSM2 token, responder key of
that type) in a temp folder; then for each worker count N, ``--repeat``
times, in this order:

(a) ceiling: bench/p11loop/p11_sign_loop.c on the same token, N processes,
    1 session each (ECDSA over a 32-byte digest; RSA: CKM_SHA256_RSA_PKCS
    over 100 bytes), ``--warmup`` then ``--seconds``.
(b) ocspmint ``SignerPool(backend="native", sessions=1)`` with N workers,
    kept full (``has_capacity``/``submit``/``collect``) with ``SignBatch``
    messages of ``--batch`` real ResponseData DER (``ResponseTemplate.tbs``,
    ~150 bytes: one SHA-1 CertID, good, thisUpdate/nextUpdate). The
    workers hash (ECDSA), sign, turn r||s into DER and answer in
    MessagePack, as in ``ocspmint run``; the parent only submits and
    collects. See bench/stage_load.py for the timing window.
(c) the same with ``backend="python"`` (python-pkcs11).

The table gives the median signatures/s per row and the median over
repetitions of rate / same-repetition ceiling. The issue's target is
(b)/(a) >= 0.95. ``--json FILE`` writes every rate; ``--markdown``
appends a dated section to bench/RESULTS.md. SOFTHSM2_CONF and the PIN
reach child processes only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from stage_load import BATCH, response_data, run_pool  # noqa: E402  (bench/stage_load.py)

from ocspmint.demo import RESPONDER_LABEL, SOFTHSM_MODULE, TOKEN_LABEL, Demo, build_demo  # noqa: E402

_spec = importlib.util.spec_from_file_location("p11loop_build", HERE / "p11loop" / "build.py")
assert _spec is not None and _spec.loader is not None
p11loop_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(p11loop_build)

RESULTS = HERE / "RESULTS.md"
ISSUER = "issuing-ca"
KEYS = ("ec-p256", "rsa-2048")
MECHANISM = {"ec-p256": "ecdsa", "rsa-2048": "rsa-sha256"}
PIN_VAR = "SIGN_STAGE_PIN"
SERIES = {"c-loop": "(a) C loop ceiling, 1 session/process",
          "native": "(b) SignerPool backend=native",
          "python": "(c) SignerPool backend=python"}


@dataclass
class Row:
    key: str
    workers: int
    series: str
    rates: list[float] = field(default_factory=list)
    ceilings: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return statistics.median(self.rates)

    @property
    def ratio(self) -> float:
        return statistics.median(r / c for r, c in zip(self.rates, self.ceilings))

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "workers": self.workers, "series": self.series, "what": SERIES[self.series],
                "per_second": self.per_second, "ratio": self.ratio, "rates": self.rates, "ceilings": self.ceilings}


def c_loop(loop: Path, demo: Demo, key: str, workers: int, seconds: float, warmup: float) -> float:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOFTHSM2_CONF": str(demo.softhsm_conf),
           PIN_VAR: demo.pin_file.read_text().strip()}
    cmd = [str(loop), SOFTHSM_MODULE, TOKEN_LABEL, RESPONDER_LABEL, MECHANISM[key], "--pin-env", PIN_VAR,
           "--processes", str(workers), "--sessions", "1", "--seconds", str(seconds), "--warmup", str(warmup)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if p.returncode != 0:
        raise SystemExit(f"p11_sign_loop failed (exit {p.returncode}): {p.stderr.strip()}")
    return float(json.loads(p.stdout)["per_second"])


def table(rows: list[Row]) -> str:
    head = ("| key | workers | measurement | signatures/s (median) | min–max | ratio to (a) (median) |\n"
            "|---|---:|---|---:|---:|---:|")
    body = [f"| {r.key} | {r.workers} | {SERIES[r.series]} | {r.per_second:,.0f} | "
            f"{min(r.rates):,.0f}–{max(r.rates):,.0f} | {r.ratio:.3f} |" for r in rows]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", nargs="+", choices=KEYS, default=list(KEYS))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of (a)+(b)+(c); medians reported")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up per run (s), not counted")
    ap.add_argument("--batch", type=int, default=BATCH, help="ResponseData per SignBatch")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.seconds <= 0 or args.batch < 1 or min(args.workers) < 1:
        ap.error("--repeat, --batch, --workers must be >= 1 and --seconds > 0")

    loop = p11loop_build.build_loop()
    rows: list[Row] = []
    tbs_bytes: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ocspmint-stage-") as tmp:
        for key in args.keys:
            demo = build_demo(Path(tmp) / key, certs=1, precerts=0, revoke=0, responder_key=key)
            spec, tbs = response_data(demo.config, ISSUER, args.batch)
            tbs_bytes[key] = sum(map(len, tbs)) / len(tbs)
            env = {"SOFTHSM2_CONF": str(demo.softhsm_conf)}
            for n in args.workers:
                by = {s: Row(key, n, s) for s in SERIES}
                rows += by.values()
                for rep in range(args.repeat):
                    ceil = c_loop(loop, demo, key, n, args.seconds, args.warmup)
                    by["c-loop"].rates.append(ceil)
                    by["c-loop"].ceilings.append(ceil)
                    line = f"{key} workers {n} #{rep + 1}: (a) {ceil:,.0f}/s"
                    for backend in ("native", "python"):
                        r = run_pool([spec], ISSUER, tbs, workers=n, backend=backend, seconds=args.seconds,
                                     warmup=args.warmup, env=env)
                        by[backend].rates.append(r["per_second"])
                        by[backend].ceilings.append(ceil)
                        line += f", {backend} {r['per_second']:,.0f}/s ({r['per_second'] / ceil:.3f})"
                    print(line, file=sys.stderr, flush=True)

    sizes = ", ".join(f"{k} {v:.0f} B" for k, v in tbs_bytes.items())
    params = (f"signing stage, keys {' '.join(args.keys)}, workers {' '.join(map(str, args.workers))}, "
              f"batch {args.batch} ResponseData (mean {sizes}), {args.seconds:g} s + {args.warmup:g} s warm-up "
              f"per run, {args.repeat} repetitions")
    print(f"\n{params}\n{table(rows)}", flush=True)
    for key in args.keys:
        for n in args.workers:
            r = next(r for r in rows if (r.key, r.workers, r.series) == (key, n, "native"))
            verdict = "meets" if r.ratio >= 0.95 else "MISSES"
            print(f"{key} workers {n}: (b)/(a) = {r.ratio:.3f} {verdict} the 0.95 target", flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "sign_stage", "date": now.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "keys": args.keys, "workers": args.workers, "repeat": args.repeat, "seconds": args.seconds,
            "warmup_seconds": args.warmup, "batch": args.batch, "tbs_bytes": tbs_bytes, "target_ratio": 0.95,
            "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        from sign_throughput import append_results  # bench/sign_throughput.py

        append_results("bench/sign_stage.py", sys.argv[1:] if argv is None else argv, params, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
