"""`ocspmint run --incremental` after a bulk load: every row an ingest
writes is a change, and an incremental run keeps the key of every changed
serial it plans in memory (routine re-signing from the journal must skip
them). Before, a 100M-row ingest made the next run hold them all (~15 GB);
past ``incremental.MAX_CHANGES`` change rows since the mark the run now
makes a full pass, whose memory does not grow with the ledger, and says
why. The limit is lowered here by running the CLI's entry point in a child
process with the constant set (a million changes would take minutes)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from e2e import openssl_check, response_path
from ocspmint.config import Source
from ocspmint.demo import Demo, build_demo, issue, revoke
from ocspmint.ledger.sqlite import SqliteTail, write_entries
from ocspmint.model import Kind, LedgerEntry, Status, serial_hex
from test_incremental import ingest, run, sqlite_config

# `ocspmint` (console script ocspmint.cli:main) with incremental.MAX_CHANGES set to argv[1]
LIMITED = ("import sys, ocspmint.incremental as inc; inc.MAX_CHANGES = int(sys.argv.pop(1)); "
           "from ocspmint.cli import main; sys.exit(main())")


def limited_run(demo: Demo, config: Path, limit: int, *flags: str) -> subprocess.CompletedProcess[str]:
    """``ocspmint run --incremental --quiet FLAGS`` with MAX_CHANGES = ``limit``."""
    cmd = [sys.executable, "-c", LIMITED, str(limit), "run", "--incremental", "--quiet", *flags, "--config", str(config)]
    return subprocess.run(cmd, env=demo.env(), capture_output=True, text=True, timeout=300)


def due_for_routine(demo: Demo, *serials: int) -> None:
    """Make the journal schedule these serials' routine re-signing now."""
    with closing(sqlite3.connect(demo.root / "state" / "journal.sqlite")) as conn, conn:
        conn.executemany("UPDATE published SET refresh_at = 1 WHERE serial = ?", [(serial_hex(s),) for s in serials])


def served(demo: Demo, serial: int) -> str:
    return openssl_check(demo, response_path(demo, serial), serial).status


def test_more_changes_than_an_incremental_run_reads_make_a_full_pass_that_says_why(tmp_path):
    """At the limit the run stays incremental (and routine re-signing does
    not publish the journal's `good` over a revocation it planned); past
    it, a full pass that names the count and the limit, publishes every
    change, and leaves a mark the next run continues from."""
    demo = build_demo(tmp_path, certs=5, precerts=1, revoke=0)
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["ok"]  # the first full pass: the mark
    a, b, c, d, e = sorted(demo.serials["good"])

    due_for_routine(demo, a, c)
    revoke(demo, a, "keyCompromise")
    revoke(demo, b, "superseded")
    new = issue(demo)
    ingest(demo)  # 3 change rows: at the limit
    p = limited_run(demo, config, 3, "--json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert summary["plan"] == "incremental", summary["plan"]
    assert summary["due"] == {"changed": 2, "new": 1, "refresh": 1}, summary["due"]  # c re-signed, a not as good
    assert (served(demo, a), served(demo, b), served(demo, c), served(demo, new)) == ("revoked", "revoked", "good",
                                                                                      "good")

    due_for_routine(demo, d)
    revoke(demo, d, "keyCompromise")
    revoke(demo, e, None)
    bulk = [issue(demo), issue(demo, precert=True)]
    ingest(demo)  # 4 change rows: past the limit
    p = limited_run(demo, config, 3)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert ("plan: full (4 ledger changes since the last complete run, more than the 3 an incremental run reads "
            "(it keeps every changed serial in memory; a full pass does not))") in p.stdout, p.stdout
    assert "due 4 {'changed': 2, 'new': 2}" in p.stdout and p.stdout.splitlines()[-1] == "OK", p.stdout
    assert [served(demo, s) for s in (d, e, *bulk)] == ["revoked", "revoked", "good", "good"]

    p = limited_run(demo, config, 3)  # the full pass left a mark past the bulk
    assert p.returncode == 0 and "due 0 {}" in p.stdout and "plan: incremental\n" in p.stdout, p.stdout
    assert served(demo, d) == "revoked"


def test_the_sqlite_tail_counts_unread_changes_and_reads_up_to_a_bound(tmp_path):
    """``SqliteTail.unread`` counts the change rows past the position
    without reading them (the run decides on it before reading);
    ``changes(upto=...)`` stops at a change id and the next call goes on
    from there, each serial once per call in its current state."""
    db = tmp_path / "ledger.sqlite"
    not_after = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=90)

    def row(serial: int, status: Status = Status.GOOD) -> LedgerEntry:
        revoked = not_after - dt.timedelta(days=100) if status is Status.REVOKED else None
        return LedgerEntry("ca", serial, Kind.CERTIFICATE, not_after, status, revoked, None, "test")

    write_entries(str(db), [row(1), row(2)])
    tail = SqliteTail(Source(type="sqlite", path=str(db)), {"ca": None})  # type: ignore[dict-item]
    tail.start()
    assert tail.unread == 0
    write_entries(str(db), [row(3), row(4)])
    write_entries(str(db), [row(3, Status.REVOKED)])  # serial 3 changed twice: 3 change rows
    tail.start(tail.cursor)
    assert tail.unread == 3
    first = [(c.item.serial, c.item.status) for c in tail.changes(upto=tail.cursor.position + 1)]
    assert first == [(3, Status.REVOKED)] and tail.unread == 2
    rest = [(c.item.serial, c.item.status) for c in tail.changes()]
    assert rest == [(4, Status.GOOD), (3, Status.REVOKED)] and tail.unread == 0
    assert list(tail.changes()) == []
