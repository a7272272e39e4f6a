"""The re-signing schedule at its edges (planner.refresh_at, Journal
refresh_at): every response is re-signed before it goes stale while its
certificate is valid, whatever failed, whatever changed in the config or
the ledger between runs. Real components: SoftHSM2, an `openssl ca`
database ingested into a SQLite ledger, the file store, the journal.

- routine work that fails at every tick (a serial the store cannot
  write) must not hold the head of ``Journal.due_by`` and starve every
  other record of `ocspmint refresh`;
- a lowered ``refresh_after`` reaches the records the full pass it forces
  finds not due yet, so `run --incremental` follows the new schedule;
- a ledger row whose notAfter changed reaches the journal, so routine
  re-signing neither retires it at the old notAfter (then nothing re-signs
  it: stale) nor re-signs it past the new one;
- a whole-ledger pass completes records as it goes (flat memory).
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from e2e import ocspmint, response_path
from ocspmint.config import load_config
from ocspmint.demo import build_demo, issue
from ocspmint.journal import Journal, Record
from ocspmint.metrics import RefreshMetrics
from ocspmint.model import Kind, LedgerEntry, Status, serial_hex
from ocspmint.planner import Planner, refresh_point
from ocspmint.refresh import Session
from test_incremental import ingest, run, sqlite_config

DAY = 86400


def journal_sql(root: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(root / "state" / "journal.sqlite", timeout=10) as db:
        return db.execute(sql, args).fetchall()


def test_a_routine_record_failing_at_every_tick_does_not_starve_the_others(tmp_path, monkeypatch):
    """routine_rate 1/s, tick 1 s: one record a tick. The earliest due
    record's serial cannot be stored; before, it was taken again at every
    tick and no other response was ever re-signed."""
    demo = build_demo(tmp_path, certs=4, precerts=0, revoke=0)
    demo.config.write_text(demo.config.read_text()
                           + '\n[refresh]\nmetrics_listen = ""\ntick = "PT1S"\nroutine_rate = 1.0\n')
    assert ocspmint(demo, "run", "--quiet").returncode == 0
    victim = demo.serials["good"][0]
    blocked = response_path(demo, victim)
    blocked.unlink()
    (blocked / "blocked").mkdir(parents=True)  # the file store's rename fails for this serial
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    with Session(load_config(demo.config), RefreshMetrics(""), lambda: False) as session:
        session.catch_up()
        journal_sql(demo.root, "UPDATE published SET refresh_at = 1")
        journal_sql(demo.root, "UPDATE published SET refresh_at = 0 WHERE serial = ?", serial_hex(victim))
        time.sleep(1.1)  # producedAt is in whole seconds: a re-signed record shows a later one
        before = dict(journal_sql(demo.root, "SELECT serial, produced_at FROM published"))
        failed = 0
        for _ in range(5):
            tick = session.tick()
            failed += len(tick.failures)
        after = dict(journal_sql(demo.root, "SELECT serial, produced_at FROM published"))
    assert failed >= 1, "the blocked serial was taken and failed"
    others = [s for s in before if s != serial_hex(victim)]
    assert all(after[s] > before[s] for s in others), "healthy records starved behind a failing one"
    assert after[serial_hex(victim)] == before[serial_hex(victim)]
    (refresh,), = journal_sql(demo.root, "SELECT refresh_at FROM published WHERE serial = ?", serial_hex(victim))
    assert refresh is not None and refresh > time.time(), "the failing record stays due, after its lease"
    shutil.rmtree(blocked)


def test_a_lowered_refresh_after_reschedules_records_not_due_yet(tmp_path):
    """refresh_after 3 d → 1 d: the full pass the changed mark forces must
    leave no record scheduled later than the new refresh point, or the
    next `run --incremental` runs re-sign them up to 3 d after thisUpdate."""
    demo = build_demo(tmp_path, certs=6, precerts=1, revoke=1)
    ingest(demo)
    assert run(demo, sqlite_config(demo), "--incremental")["ok"]
    config = sqlite_config(demo, '[response]\nrefresh_after = "P1D"\n')
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and "refresh_after changed" in summary["plan"] and summary["due"] == {}, summary
    rows = journal_sql(demo.root, "SELECT this_update, next_update, refresh_at, not_after FROM published "
                                  "WHERE refresh_at IS NOT NULL")
    assert rows
    for tu, nu, at, _ in rows:
        latest = refresh_point(dt.datetime.fromtimestamp(tu, dt.timezone.utc), dt.datetime.fromtimestamp(nu, dt.timezone.utc),
                               dt.timedelta(days=1))
        assert at <= latest.timestamp(), "a record keeps the refresh time of the old refresh_after"
    assert run(demo, config, "--incremental")["plan"] == "incremental"


def test_a_ledger_not_after_change_reaches_the_routine_schedule(tmp_path):
    """A 1-day certificate is scheduled at its notAfter (to be retired
    then); its ledger row then says +30 d (and another one's notAfter
    moves earlier). `run --incremental` plans the changes: the journal
    must take the ledger's notAfter, or routine retires the first at the
    old one (and no run re-signs it again: its response goes stale) and
    re-signs the second past the ledger's notAfter."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    short = issue(demo, days=1)
    longer = demo.serials["good"][0]
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["ok"]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        db.execute("UPDATE entries SET not_after = strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '+30 days') WHERE serial = ?",
                   (serial_hex(short),))
        db.execute("UPDATE entries SET not_after = strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '+2 days') WHERE serial = ?",
                   (serial_hex(longer),))
        ledger = dict(db.execute("SELECT serial, strftime('%s', not_after) FROM entries"))
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"] == "incremental", summary
    for serial in (short, longer):
        (not_after, refresh, tu), = journal_sql(demo.root, "SELECT not_after, refresh_at, this_update FROM published "
                                                           "WHERE serial = ?", serial_hex(serial))
        assert not_after == int(ledger[serial_hex(serial)]), "the journal keeps a notAfter the ledger no longer states"
        assert tu + DAY * 3 // 2 - 1 <= refresh <= min(not_after, tu + 3 * DAY), (serial, refresh, not_after, tu)


def test_a_whole_ledger_pass_completes_records_as_it_goes(tmp_path):
    """A journal whose records an earlier version wrote (no kind,
    notAfter, refresh_at): a full pass judges them all not due and must
    complete them in chunks, not hold every one in memory to the end."""
    total = 25_000
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    not_after = now + dt.timedelta(days=30)
    with Journal(tmp_path / "state") as journal:
        journal.record([Record("ca", s, now, now + dt.timedelta(days=7), "good", None, None, "aa", b"x" * 32)
                        for s in range(1, total + 1)])
        planner = Planner(journal, {"ca": "aa"}, dt.timedelta(days=3), now)
        held: list[int] = []

        def entries() -> Iterator[LedgerEntry]:
            for s in range(1, total + 1):
                held.append(len(planner.incomplete))
                yield LedgerEntry("ca", s, Kind.CERTIFICATE, not_after, Status.GOOD, None, None, "ledger")

        assert list(planner.due(entries())) == []
        planner.complete_records()
        assert max(held) < total // 2, f"{max(held)} incomplete records held at once"
        assert journal.unscheduled(("", 0), 1) == []
        assert journal.get("ca", total).not_after == not_after


def test_records_of_an_issuer_no_longer_configured_do_not_force_full_passes(tmp_path):
    """An issuer left the config while its certificates are unexpired:
    routine retires its records (refresh_at NULL, notAfter ahead). Before,
    `run --incremental` took them for a journal written before refresh_at
    existed, and every later run was a full pass until they expired."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["ok"]
    # the rows "old-ca" (no longer configured) left, due now
    journal_sql(demo.root, "INSERT INTO published SELECT 'old-ca', serial, this_update, next_update, status, revoked_at, "
                           "reason, signer, sha256, why, kind, not_after, 1, produced_at FROM published")
    retiring = run(demo, config, "--incremental")
    assert retiring["ok"] and retiring["plan"] == "incremental" and retiring["published"] == 0, retiring
    assert journal_sql(demo.root, "SELECT count(*) FROM published WHERE issuer = 'old-ca' AND refresh_at IS NULL "
                                  "AND not_after > strftime('%s', 'now')") == [(2,)]
    assert run(demo, config, "--incremental")["plan"] == "incremental"


def test_refresh_never_re_signs_the_journal_status_of_a_serial_whose_ledger_row_is_in_error(tmp_path, monkeypatch):
    """The CA puts a serial on hold (refused, BR 4.9.13: an error row
    naming it). Before, `refresh` logged it once and kept re-signing the
    journal's `good` at every refresh time, silently."""
    from ocspmint.demo import revoke

    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    demo.config.write_text(demo.config.read_text() + '\n[refresh]\nmetrics_listen = ""\n')
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))
    victim = demo.serials["good"][0]
    with Session(load_config(demo.config), RefreshMetrics(""), lambda: False) as session:
        session.catch_up()
        revoke(demo, victim, "certificateHold")
        tick = session.tick()
        assert [f.stage for f in tick.failures] == ["ledger"] and "certificateHold" in tick.failures[0].message
        journal_sql(demo.root, "UPDATE published SET refresh_at = 0 WHERE serial = ?", serial_hex(victim))
        time.sleep(1.1)  # producedAt is in whole seconds
        (before,), = journal_sql(demo.root, "SELECT produced_at FROM published WHERE serial = ?", serial_hex(victim))
        tick = session.tick()
        (after, refresh), = journal_sql(demo.root, "SELECT produced_at, refresh_at FROM published WHERE serial = ?",
                                        serial_hex(victim))
    assert after == before and tick.published == 0, "re-signed the journal's good over a refused ledger row"
    assert refresh is None  # off the schedule until the row is right again


def test_a_pending_change_whose_row_is_then_deleted_is_dropped_not_published(tmp_path, monkeypatch):
    """`refresh`: a new precertificate whose response cannot be stored
    stays pending; its ledger row is then deleted. Before, the pending
    entry was published `good` at its retry, for a serial the ledger no
    longer holds."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    ingest(demo)
    config = sqlite_config(demo, '[refresh]\nmetrics_listen = ""\n')
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))
    with Session(load_config(config), RefreshMetrics(""), lambda: False) as session:
        session.catch_up()
        new = issue(demo, precert=True)
        path = response_path(demo, new)
        (path / "blocked").mkdir(parents=True)
        ingest(demo)
        first = session.tick()
        assert [f.stage for f in first.failures] == ["store"] and len(session.pending) == 1
        with sqlite3.connect(demo.root / "ledger.sqlite") as db:
            db.execute("DELETE FROM entries WHERE serial = ?", (serial_hex(new),))
        shutil.rmtree(path)
        for pending in session.pending.values():
            pending.retry_at = 0.0  # its backoff passed
        second = session.tick()
    assert [f.stage for f in second.failures] == ["ledger"] and "no longer in the ledger" in second.failures[0].message
    assert second.published == 0 and not path.exists() and session.pending == {}
    assert journal_sql(demo.root, "SELECT status FROM published WHERE serial = ?", serial_hex(new)) == []
