"""Writing a SQLite ledger (``ocspmint.ledger.sqlite.write_entries``, the path
of issuance systems that write the ledger directly) by the writer's page
cache size, against a ceiling measured in the same run.

Usage::

    .venv/bin/python bench/ledger_write.py [--rows 1000000]
        [--cache-kib 2000,65536] [--dir DIR] [--markdown]

Rows are ``bench/sign_throughput.py``'s synthetic entries (random 16-byte
serials, so they land at random places of the ledger's (issuer, serial)
b-tree, as an issuance system writes them). For each ``--cache-kib`` a fresh
ledger takes all of them with ``write_entries``, ``CACHE_KIB`` set to that
size (2000 is SQLite's default of 2 MiB). The ceiling is the same rows in key
order into a fresh ledger: every row appends to the b-tree, the fastest this
schema (with its change-log trigger) can be written. Prints µs per row
(wall and CPU) and the ratio ceiling / case (1.0 = as fast as key order).
The ledgers are made below ``--dir`` (default: a temp folder) and removed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sign_throughput import append_results, synthetic_entries  # noqa: E402

import ocspmint.ledger.sqlite as ledger_sqlite  # noqa: E402
from ocspmint.model import LedgerEntry  # noqa: E402


def timed_write(path: Path, entries: list[LedgerEntry], cache_kib: int) -> tuple[float, float]:
    """(wall s, CPU s) of ``write_entries`` into a new ledger at ``path``."""
    ledger_sqlite.CACHE_KIB = cache_kib
    wall, cpu = time.perf_counter(), time.process_time()
    ledger_sqlite.write_entries(str(path), entries)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cache-kib", default=f"2000,{ledger_sqlite.CACHE_KIB}",
                    help="comma-separated writer page cache sizes in KiB (default: SQLite's and ocspmint's)")
    ap.add_argument("--dir", type=Path, help="where the ledgers are made (default: the temp folder)")
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args(argv)
    sizes = [int(k) for k in args.cache_kib.split(",")]
    entries = list(synthetic_entries(args.rows))
    in_key_order = sorted(entries, key=lambda e: (e.issuer, e.serial))
    lines = ["| case | cache KiB | wall s | µs/row | CPU µs/row | ceiling / case |", "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="ledger-write-", dir=args.dir) as tmp:
        default = ledger_sqlite.CACHE_KIB
        ceiling, ceiling_cpu = timed_write(Path(tmp) / "ceiling.sqlite", in_key_order, default)
        results = [("key order (ceiling)", default, ceiling, ceiling_cpu)]
        for kib in sizes:
            results.append(("random order", kib, *timed_write(Path(tmp) / f"random-{kib}.sqlite", entries, kib)))
    for name, kib, wall, cpu in results:
        lines.append(f"| {name} | {kib:,} | {wall:.1f} | {1e6 * wall / args.rows:.1f} | {1e6 * cpu / args.rows:.1f} "
                     f"| {ceiling / wall:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        append_results("bench/ledger_write.py", sys.argv[1:] if argv is None else argv,
                       f"ledger write, {args.rows:,} rows", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
