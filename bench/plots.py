"""PNG plots from the benchmarks' JSON files.

Usage::

    .venv/bin/python bench/plots.py [--nethsm build/nethsm.json] [--stage build/sign_stage.json]
        [--out-dir bench]

- ``--nethsm`` (bench/nethsm_throughput.py --json): ``plot_sessions.png``,
  throughput against sessions in flight, one panel per transport, one line
  per series (C loop, ocspmint native signer, SignerPool...), with the
  HSM's capacity (slots / latency) as a dashed line.
- ``--stage`` (bench/sign_stage.py --json): ``plot_workers.png``,
  throughput against workers, one panel per key type (P-256, RSA-2048):
  C loop ceiling, SignerPool native, SignerPool python (median, with the
  min–max of the repetitions as error bars).

Needs matplotlib (the ``bench`` extra). Either option may be left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent
STAGE_LABELS = {"c-loop": "C loop ceiling (p11_sign_loop)", "native": "ocspmint SignerPool, native",
                "python": "ocspmint SignerPool, python-pkcs11"}
KEY_LABELS = {"ec-p256": "ECDSA P-256", "rsa-2048": "RSA-2048"}
SERIES_LABELS = {"c-loop": "C loop (p11_sign_loop)", "ocspmint-native": "ocspmint _p11native.Signer",
                 "ocspmint-pool": "ocspmint SignerPool (native)"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sessions(data: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    transports = list(dict.fromkeys(s["transport"] for s in data["series"]))
    fig, axes = plt.subplots(1, len(transports), figsize=(6.5 * len(transports), 4.8), squeeze=False,
                             sharey=True)
    capacity = data.get("capacity_per_second")
    for ax, transport in zip(axes[0], transports):
        for s in (s for s in data["series"] if s["transport"] == transport):
            pts = sorted(s["points"], key=lambda p: p["sessions"])
            ax.plot([p["sessions"] for p in pts], [p["per_second"] for p in pts], marker="o",
                    label=SERIES_LABELS.get(s["name"], s["name"]))
        if capacity:
            ax.axhline(capacity, color="grey", linestyle="--",
                       label=f"capacity {data['slots']} slots / {data['latency_ms']:g} ms = {capacity:,.0f}/s")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(f"sessions in flight per process ({data.get('processes', 1)} process(es))")
        ax.set_title(f"transport: {transport}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("signatures/s")
    fig.suptitle(f"Simulated network HSM, {data.get('key', '?')}: throughput vs sessions in flight")
    fig.tight_layout()
    path = out / "plot_sessions.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_workers(data: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    keys = list(dict.fromkeys(r["key"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for series, label in STAGE_LABELS.items():
            rows = sorted((r for r in data["rows"] if r["key"] == key and r["series"] == series),
                          key=lambda r: r["workers"])
            if not rows:
                continue
            med = [r["per_second"] for r in rows]
            err = [[m - min(r["rates"]) for m, r in zip(med, rows)], [max(r["rates"]) - m for m, r in zip(med, rows)]]
            ratio = "" if series == "c-loop" else \
                " (" + ", ".join(f"{r['ratio']:.2f}" for r in rows) + " of ceiling)"
            ax.errorbar([r["workers"] for r in rows], med, yerr=err, marker="o", capsize=3, label=label + ratio)
        ax.set_xticks(sorted({r["workers"] for r in data["rows"]}))
        ax.set_xlabel("workers (processes, 1 session each)")
        ax.set_ylabel("signatures/s")
        ax.set_ylim(bottom=0)
        ax.set_title(KEY_LABELS.get(key, key))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Signing stage on SoftHSM2: batches of {data.get('batch', '?')} ResponseData, "
                 f"median of {data.get('repeat', '?')}")
    fig.tight_layout()
    path = out / "plot_workers.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nethsm", type=Path, help="JSON from bench/nethsm_throughput.py --json")
    ap.add_argument("--stage", type=Path, help="JSON from bench/sign_stage.py --json")
    ap.add_argument("--out-dir", type=Path, default=OUT, help="where the PNGs go (default: bench/)")
    args = ap.parse_args(argv)
    if not args.nethsm and not args.stage:
        ap.error("give --nethsm and/or --stage")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.nethsm:
        print(f"wrote {plot_sessions(json.loads(args.nethsm.read_text()), args.out_dir)}")
    if args.stage:
        print(f"wrote {plot_workers(json.loads(args.stage.read_text()), args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
