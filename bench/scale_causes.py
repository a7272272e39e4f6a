"""Why time per 1,000 responses grows from 1M to 10M ledger rows
(``bench/scale.py``): the two suspects measured apart, each at a small and a
large size in the same run, the small size being the reference (ratio 1).

Usage::

    .venv/bin/python bench/scale_causes.py [--dir DIR] [--count 20000]
        [--small-files 3900] [--large-files 39000]
        [--small-rows 1000000] [--large-rows 10000000] [--markdown]

1. **Store folder size.** A file store spreads (issuer, serial) over 256
   folders (``object_key``), so a 1M-row ledger puts ~3,900 files in each
   and a 10M-row ledger ~39,000. Two folders are filled with that many files,
   then ``--count`` new responses are written into them with
   ``FileStore.put`` (temp file, rename): µs per file, wall and system CPU.
2. **Journal size.** A journal holding ``--small-rows`` or
   ``--large-rows`` records (filled by SQLite itself, serials spread over
   the key space) takes ``--count`` new records with ``Journal.record``,
   ``Runner.JOURNAL_ROWS`` a transaction, as a run journals them: µs per
   record, wall and CPU, in two orders. *Ledger order*: serials ascending
   and above every journaled one, as a first run from the SQLite ledger
   journals them (it reads the ledger in (issuer, serial) order, the
   journal's key). *Random*: serials at random places, as a refresh (due
   by ``refresh_at``) or an ``index.txt`` ledger (issuance order) does.
   Either way ``refresh_at`` (the journal's second b-tree) is random, as
   ``planner.refresh_at`` spreads it by a hash of the serial. The page
   cache of the file is warm (it was just written), as in a run.

Everything is made below ``--dir`` (default: a temp folder on the root file
system) and removed at the end; nothing is deleted before a measurement
(on a file system without a journal, ext4 makes file creation slow for a
while after many deletions, see bench/RESULTS.md "This machine").
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sign_throughput import append_results  # noqa: E402

from ocspmint.journal import Journal, Record  # noqa: E402
from ocspmint.runner import Runner  # noqa: E402
from ocspmint.store import FileStore  # noqa: E402

ISSUER = "issuing-ca"
FOLDERS = ("00", "01")  # two of the 256 first-level folders of a file store
RESPONSE = bytes(471)  # the size of a P-256 response with one SHA-1 CertID


def _timed(fn: Callable[[], None]) -> tuple[float, float, float]:
    """(wall, user, system) seconds of calling ``fn()``."""
    t0, c0 = time.perf_counter(), os.times()
    fn()
    t1, c1 = time.perf_counter(), os.times()
    return t1 - t0, c1.user - c0.user, c1.system - c0.system


def store_case(root: Path, per_folder: int, count: int, rng: random.Random) -> tuple[float, float, float]:
    """Fill FOLDERS with ``per_folder`` files each, then time ``count`` new puts."""
    store = FileStore(root)
    for folder in FOLDERS:
        for _ in range(per_folder):
            store.put(f"{folder}/{ISSUER}/{rng.getrandbits(128):040x}", RESPONSE)
    os.sync()
    keys = [f"{FOLDERS[i % len(FOLDERS)]}/{ISSUER}/{rng.getrandbits(128):040x}" for i in range(count)]

    def put_all() -> None:
        for k in keys:
            store.put(k, RESPONSE)
    return _timed(put_all)


def fill_journal(state: Path, rows: int) -> None:
    """``rows`` records in a new journal, written by SQLite in serial order
    (serials i·2^128 + a random low part: the top bits spread them over
    the same range as ``new_records``)."""
    with Journal(state):
        pass  # creates the schema and indexes
    db = sqlite3.connect(state / "journal.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    now = int(time.time())
    db.execute("BEGIN")
    db.execute(
        "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?) "
        "INSERT INTO published (issuer, serial, this_update, next_update, status, revoked_at, reason, signer, sha256, "
        "why, kind, not_after, refresh_at, produced_at) "
        "SELECT ?, printf('%08x%016x%016x', i, random() & 0x7fffffffffffffff, random() & 0x7fffffffffffffff), "
        "?, ? + 604799, 'good', NULL, NULL, ?, randomblob(32), 'new', 'certificate', ? + 7776000, "
        "? + 259200 + abs(random() % 86400), ? FROM c",
        (rows, ISSUER, now, now, "ab" * 20, now, now, now))
    db.execute("COMMIT")
    db.close()


def new_records(rows: int, count: int, rng: random.Random, ledger_order: bool) -> list[Record]:
    """``count`` records for serials not journaled yet: ascending above the
    ``rows`` filled ones (``ledger_order``) or at random places among them."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    tops = range(rows, rows + count) if ledger_order else [rng.randrange(rows) for _ in range(count)]
    return [Record(ISSUER, (top << 128) | rng.getrandbits(128), now, now + dt.timedelta(seconds=604799),
                   "good", None, None, "ab" * 20, rng.randbytes(32), "new", "certificate", now + dt.timedelta(days=90),
                   now + dt.timedelta(days=3, seconds=rng.randrange(86400)), now) for top in tops]


def journal_case(state: Path, rows: int, count: int, rng: random.Random, ledger_order: bool) -> tuple[float, float, float]:
    """Fill a journal with ``rows`` records (once per ``state``), then time
    journaling ``count`` new ones."""
    if not state.exists():
        fill_journal(state, rows)
    records = new_records(rows, count, rng, ledger_order)
    with Journal(state) as journal:
        def record_all() -> None:
            for i in range(0, count, Runner.JOURNAL_ROWS):
                journal.record(records[i:i + Runner.JOURNAL_ROWS])
        return _timed(record_all)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="parent folder of the stores and journals (default: the temp folder)")
    ap.add_argument("--count", type=int, default=20_000, help="files written / records journaled per case")
    ap.add_argument("--small-files", type=int, default=3_900, help="files per folder, small case (1M-row store)")
    ap.add_argument("--large-files", type=int, default=39_000, help="files per folder, large case (10M-row store)")
    ap.add_argument("--small-rows", type=int, default=1_000_000)
    ap.add_argument("--large-rows", type=int, default=10_000_000)
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args()

    rng = random.Random(1)
    lines = ["| suspect | size | µs per item, wall | user | system | ratio to the small size (wall) |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="ocspmint-scale-causes-", dir=args.dir) as tmp:
        cases = [("store folder", f"{n:,} files per folder", lambda n=n: store_case(Path(tmp, f"store-{n}"), n, args.count, rng))
                 for n in (args.small_files, args.large_files)]
        for ledger_order, suspect in ((True, "journal, ledger order (first run)"), (False, "journal, random serials (refresh)")):
            cases += [(suspect, f"{n:,} rows", lambda n=n, o=ledger_order: journal_case(Path(tmp, f"journal-{n}"), n, args.count, rng, o))
                      for n in (args.small_rows, args.large_rows)]
        base: dict[str, float] = {}
        for suspect, size, case in cases:
            wall, user, system = case()
            per = [1e6 * x / args.count for x in (wall, user, system)]
            base.setdefault(suspect, per[0])
            lines.append(f"| {suspect} | {size} | {per[0]:.1f} | {per[1]:.1f} | {per[2]:.1f} | {per[0] / base[suspect]:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    where = f"in {args.dir}" if args.dir else "in the temp folder"
    params = f"{args.count:,} per case, {where}"
    table = "\n".join(lines)
    print(f"\n{params}\n{table}")
    if args.markdown:
        append_results("bench/scale_causes.py", sys.argv[1:], params, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
