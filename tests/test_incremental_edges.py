"""`ocspmint run --incremental` and the SQLite change log when the log does
not continue from the mark: a ledger restored from a backup (change ids
reused), change rows deleted before a run read them, an entries table
rebuilt (its triggers dropped), a version-1 ledger. Each must make a full
pass and say why, never plan nothing while a revocation waits."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from e2e import openssl_check, response_path
from ocspmint.config import Source, load_config
from ocspmint.demo import Demo, build_demo
from ocspmint.issuer import load_issuers
from ocspmint.ledger.sqlite import ChangeLogError, connect
from ocspmint.ledger.tail import Tail
from ocspmint.model import LedgerEntry, serial_hex
from test_incremental import ingest, run, sqlite_config
from test_ledger_tail import V1_SCHEMA

FOLLOW = "full (the ledger's change log cannot be followed: "


def sql(db: Path, statement: str, *args: object) -> None:
    """What a CA's issuance system does: plain SQL in its own transaction."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(statement, args)


def revoke_row(db: Path, serial: int) -> None:
    sql(db, "UPDATE entries SET status = 'revoked', revoked_at = '2025-01-01T00:00:00Z', reason = 1 WHERE serial = ?",
        serial_hex(serial))


def backup(db: Path, to: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("VACUUM INTO ?", (str(to),))


def restore(copy: Path, db: Path) -> None:
    """Put a backup in place of the ledger (no connection is open)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    os.replace(copy, db)


def served(demo: Demo, serial: int) -> str:
    return openssl_check(demo, response_path(demo, serial), serial).status


def ready(tmp_path: Path) -> tuple[Demo, Path, Path]:
    """A demo, its sqlite config and ledger, after a first complete run (the mark)."""
    demo = build_demo(tmp_path, certs=4, precerts=1, revoke=0)
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["ok"]
    return demo, config, demo.root / "ledger.sqlite"


def test_a_ledger_restored_from_a_backup_makes_a_full_pass(tmp_path):
    """The backup's change log ends before the mark; the changes written
    after the restore reuse the ids the mark has passed. Before, the run
    planned nothing and left the revocation written after the restore
    served good, with exit 0."""
    demo, config, db = ready(tmp_path)
    first, second = sorted(demo.serials["good"])[:2]
    backup(db, tmp_path / "backup.sqlite")
    revoke_row(db, first)
    assert run(demo, config, "--incremental")["due"] == {"changed": 1}
    assert served(demo, first) == "revoked"

    restore(tmp_path / "backup.sqlite", db)  # the ledger says `first` is good again
    revoke_row(db, second)
    summary = run(demo, config, "--incremental")
    assert summary["plan"].startswith(FOLLOW) and "restored from a backup" in summary["plan"], summary["plan"]
    assert served(demo, second) == "revoked"
    assert served(demo, first) == "revoked", "a revocation is final"
    (failure,) = summary["failures"]  # the restored ledger contradicts a published revocation: not ok
    assert not summary["ok"] and failure["serial"] == serial_hex(first) and "published revoked" in failure["message"]


def test_change_rows_deleted_before_a_run_read_them_make_a_full_pass(tmp_path):
    """docs/ledger.md's pruning (change rows older than a day) while the mark
    lags (no run ended ok for two days): the revocation's change row is gone.
    Rows the mark has passed may be deleted: the next run stays incremental."""
    demo, config, db = ready(tmp_path)
    serial = sorted(demo.serials["good"])[0]
    revoke_row(db, serial)
    sql(db, "UPDATE changes SET at = at - 2 * 86400")  # two days pass
    sql(db, "DELETE FROM changes WHERE at < CAST(strftime('%s','now') AS INTEGER) - 86400")
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"].startswith(FOLLOW) and "deleted before being read" in summary["plan"]
    assert summary["due"] == {"changed": 1} and served(demo, serial) == "revoked"

    sql(db, "DELETE FROM changes")  # every row the mark has passed
    assert run(demo, config, "--incremental")["plan"] == "incremental"
    other = sorted(demo.serials["good"])[1]
    revoke_row(db, other)
    summary = run(demo, config, "--incremental")
    assert (summary["plan"], summary["due"]) == ("incremental", {"changed": 1}) and served(demo, other) == "revoked"


REBUILD = """
BEGIN;
CREATE TABLE entries_new(
    issuer TEXT NOT NULL, serial TEXT NOT NULL, kind TEXT NOT NULL, not_after TEXT NOT NULL,
    status TEXT NOT NULL, revoked_at TEXT, reason INTEGER, source TEXT NOT NULL, not_before TEXT,
    PRIMARY KEY (issuer, serial)) WITHOUT ROWID;
INSERT INTO entries_new SELECT * FROM entries;
DROP TABLE entries;
ALTER TABLE entries_new RENAME TO entries;
COMMIT;
"""


def test_a_rebuilt_entries_table_loses_its_triggers_and_runs_go_full_until_they_are_back(tmp_path):
    """SQLite's ALTER TABLE recipe (create, copy, drop, rename) drops the
    change log's triggers: nothing written after it is logged. Runs make a
    full pass while they are missing; an ocspmint writer re-creates them
    with a new log token, which voids the mark (one more full pass)."""
    demo, config, db = ready(tmp_path)
    first, second = sorted(demo.serials["good"])[:2]
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(REBUILD)
    revoke_row(db, first)
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"].startswith(FOLLOW) and "trigger entries_updated" in summary["plan"]
    assert served(demo, first) == "revoked"

    # re-created by hand, with the same names: the changes made without them are in no log
    revoke_row(db, second)
    with closing(connect(str(tmp_path / "scratch.sqlite"))) as scratch:
        ddl = [row[0] for row in scratch.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'")]
    with closing(sqlite3.connect(db)) as conn, conn:
        for statement in ddl:
            conn.execute(statement)
    summary = run(demo, config, "--incremental")
    assert summary["plan"].startswith("full (the last full pass could not follow the ledger's change log"), summary
    assert served(demo, second) == "revoked"
    assert run(demo, config, "--incremental")["plan"] == "incremental"

    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(REBUILD)
    connect(str(db)).close()  # any ocspmint writer (ingest, write_entries) re-creates the log
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"].startswith(FOLLOW) and "log re-created" in summary["plan"], summary["plan"]
    assert run(demo, config, "--incremental")["plan"] == "incremental"


def test_a_version_1_ledger_says_why_runs_stay_full(tmp_path):
    """Before, every run said "no run has published everything it planned",
    though each one had: the cursor cannot read a version-1 ledger."""
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    ingest(demo)
    db = demo.root / "ledger.sqlite"
    v1 = tmp_path / "v1.sqlite"
    with closing(sqlite3.connect(v1)) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("ATTACH ? AS v2", (str(db),))
        with conn:
            conn.execute("INSERT INTO entries SELECT issuer, serial, kind, not_after, status, revoked_at, reason, source"
                         " FROM v2.entries")
    restore(v1, db)
    config = sqlite_config(demo)
    for _ in range(2):
        summary = run(demo, config, "--incremental")
        assert summary["ok"] and summary["plan"].startswith(FOLLOW), summary["plan"]
        assert "schema version '1'" in summary["plan"] and "ocspmint ingest" in summary["plan"]


def test_sqlite_tail_refuses_a_log_that_does_not_continue(tmp_path):
    """``ocspmint refresh`` keeps a Tail for hours: a ledger swapped for a
    backup under it must raise (reported every tick) instead of reading
    nothing. Rolled-back writes and deleting rows it has read do not."""
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    ingest(demo)
    db = demo.root / "ledger.sqlite"
    source = Source(type="sqlite", path=str(db))
    issuers = load_issuers(load_config(demo.config))
    serials = sorted(demo.serials["good"])
    tail = Tail(source, issuers)
    tail.start()
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:  # a rolled-back revocation leaves no gap
        conn.execute("BEGIN")
        conn.execute("UPDATE entries SET status = 'revoked', revoked_at = '2025-01-01T00:00:00Z' WHERE serial = ?",
                     (serial_hex(serials[0]),))
        conn.execute("ROLLBACK")
    assert list(tail.changes()) == []
    backup(db, tmp_path / "backup.sqlite")
    revoke_row(db, serials[0])
    (change,) = tail.changes()
    assert isinstance(change.item, LedgerEntry) and change.item.serial == serials[0]
    sql(db, "DELETE FROM changes")  # every row read
    assert list(tail.changes()) == []

    restore(tmp_path / "backup.sqlite", db)
    revoke_row(db, serials[1])  # takes the id the tail has read
    with pytest.raises(ChangeLogError, match="restored from a backup"):
        list(tail.changes())
    with pytest.raises(ChangeLogError):  # every call, until a new start() (and a full pass)
        list(tail.changes())
    tail.start()
    assert list(tail.changes()) == []


def test_refresh_reads_a_ledger_restored_under_it_whole_and_publishes_what_changed(tmp_path):
    """`ocspmint refresh` on a SQLite ledger swapped for a backup while it
    runs, then a revocation written into the restored ledger (taking a
    change id the service had read): the service logs ``ledger_reread``,
    reads the source whole once and publishes the revocation. Before, the
    tail read nothing from it for ever (the revocation stayed good)."""
    from faultkit import wait_for
    from test_refresh_faults import Refresh

    demo, _, db = ready(tmp_path)
    demo.config.write_text(sqlite_config(demo, '[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n\n').read_text()
                           .replace("workers = 2", "workers = 1"))
    backup(db, tmp_path / "backup.sqlite")
    first, second = sorted(demo.serials["good"])[:2]
    svc = Refresh(demo, tmp_path / "refresh.log")
    try:
        wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        revoke_row(db, first)
        wait_for(lambda: svc.row(first) is not None and svc.row(first)[0] == "revoked", "the first revocation")
        restore(tmp_path / "backup.sqlite", db)
        revoke_row(db, second)
        wait_for(lambda: svc.row(second) is not None and svc.row(second)[0] == "revoked", "the second revocation", 60)
        (reread,) = svc.events("ledger_reread")[:1]
        assert "restored from a backup" in reread["reason"], reread
        assert served(demo, second) == "revoked" and served(demo, first) == "revoked"  # a revocation is final
    finally:
        svc.kill()


def test_a_deleted_ledger_row_is_reported_and_never_re_signed_from_the_journal(tmp_path):
    """A CA deletes a serial's ledger row. Routine re-signing reads the
    journal, not the ledger: before, the deletion was not logged, the run
    ended ok and re-signed the serial `good` from the journal at its
    refresh time, for a serial the ledger no longer holds. Now the change
    log records it, each run reports it (exit 1), the serial leaves the
    schedule, and putting the row back schedules it again."""
    demo, config, db = ready(tmp_path)
    gone = sorted(demo.serials["good"])[0]
    journal = demo.root / "state" / "journal.sqlite"

    def record() -> tuple:
        with closing(sqlite3.connect(journal)) as conn:
            return conn.execute("SELECT refresh_at, not_after, produced_at FROM published WHERE serial = ?",
                                (serial_hex(gone),)).fetchone()

    sql(journal, "UPDATE published SET refresh_at = 1 WHERE serial = ?", serial_hex(gone))  # its refresh time came
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT * FROM entries WHERE serial = ?", (serial_hex(gone),)).fetchone()
    produced = record()[2]
    sql(db, "DELETE FROM entries WHERE serial = ?", serial_hex(gone))
    for _ in range(2):  # the mark stays where it was: reported again by the next incremental run
        summary = run(demo, config, "--incremental")
        assert summary["plan"] == "incremental" and not summary["ok"] and summary["published"] == 0, summary
        (failure,) = summary["failures"]
        assert failure["stage"] == "ledger" and failure["serial"] == serial_hex(gone), failure
        assert "no longer in the ledger" in failure["message"]
        assert record() == (None, None, produced)  # off the schedule, not re-signed

    placeholders = ",".join("?" * len(row))
    sql(db, f"INSERT INTO entries VALUES ({placeholders})", *row)  # the row put back
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"] == "incremental", summary
    refresh, not_after, _ = record()
    assert refresh is not None and not_after is not None


def test_a_ledger_without_the_deletion_triggers_is_still_followed_until_ingest_adds_them(tmp_path):
    """A ledger an earlier ocspmint made has no deletion triggers: it is
    still read incrementally (an upgrade must not stop `run --incremental`
    or `refresh`); `ocspmint ingest` adds them, which costs one full pass."""
    demo, config, db = ready(tmp_path)
    for trigger in ("entries_deleted", "entries_rekeyed"):
        sql(db, f"DROP TRIGGER {trigger}")
    revoke_row(db, sorted(demo.serials["good"])[0])
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"] == "incremental" and summary["due"] == {"changed": 1}, summary
    connect(str(db)).close()  # as `ocspmint ingest` opens it
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"].startswith(FOLLOW) and "log re-created" in summary["plan"], summary["plan"]
    assert run(demo, config, "--incremental")["plan"] == "incremental"


def test_a_row_deleted_while_no_reader_follows_the_log_is_caught_by_the_next_full_pass(tmp_path):
    """Plain full runs read the ledger, not the change log: before, a row
    deleted between two of them left its journal record scheduled, and
    routine re-signing (refresh, or --incremental once its mark had passed
    the deletion) kept signing it `good`. The full pass now sweeps the
    journal against the SQLite ledger: the serial leaves the schedule and
    is reported once."""
    demo, config, db = ready(tmp_path)
    gone = sorted(demo.serials["good"])[0]
    sql(db, "DELETE FROM entries WHERE serial = ?", serial_hex(gone))
    summary = run(demo, config)  # a plain full pass
    assert not summary["ok"], summary
    (failure,) = summary["failures"]
    assert failure["stage"] == "ledger" and failure["serial"] == serial_hex(gone)
    assert "no longer in the ledger" in failure["message"]
    with closing(sqlite3.connect(demo.root / "state" / "journal.sqlite")) as conn:
        (refresh, not_after), = conn.execute("SELECT refresh_at, not_after FROM published WHERE serial = ?",
                                             (serial_hex(gone),)).fetchall()
    assert (refresh, not_after) == (None, None)
    assert run(demo, config)["ok"]  # reported once: it is no longer scheduled
