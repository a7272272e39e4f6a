"""The sweep after a full pass (docs/ledger.md, "the sweep") must not turn
a broken ledger into an outage, and must work for any number of sources.

A ledger read as complete but (nearly) empty (index.txt truncated by a bad
deploy, a sqlite ledger swapped for an empty one) made the sweep forget
every scheduled serial: none was re-signed again, and every served
response expired at its nextUpdate, announced only as one failure line per
serial. Now an issuer whose sweep would forget more than ``[sweep]``
allows keeps its schedule, and the run fails with one line saying so.

Before, a config of more than 9 `sqlite` sources made every sweep fail:
SQLite attaches at most 10 databases (the journal and 9 ledgers).

Real components: `openssl ca` databases, SoftHSM2, the CLI, the journal,
the file store and the refresh Session.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest

from ocspmint.config import ConfigError, load_config
from ocspmint.demo import build_demo
from ocspmint.ledger.sqlite import connect, write_entries
from ocspmint.model import Kind, LedgerEntry, Status, serial_hex, utc_now
from test_absent_sweep import INDEX, SQLITE, _all_due, _rewritten, _session, absent_failures, journal_sql, with_sources
from test_incremental import ingest, run

REFRESH = '[refresh]\nmetrics_listen = ""\n'
GUARD = "would forget"


def scheduled_serials(demo) -> set[str]:
    return {s for (s,) in journal_sql(demo, "SELECT serial FROM published WHERE refresh_at IS NOT NULL")}


def guard_failures(summary: dict) -> list[dict]:
    return [f for f in summary["failures"] if GUARD in f["message"]]


def test_an_index_cut_to_one_line_forgets_nothing_and_routine_keeps_re_signing(tmp_path, monkeypatch):
    """index.txt cut to its first line after a run: the next run fails with
    one failure naming the issuer and the numbers, every record stays
    scheduled, and a refresh tick still re-signs them. Before, all but one
    left the schedule (one failure each) and were never re-signed again."""
    demo = build_demo(tmp_path, certs=12, precerts=2, revoke=1)
    config = with_sources(demo, INDEX, REFRESH)
    first = run(demo, config)
    assert first["ok"]
    before = scheduled_serials(demo)
    assert len(before) == first["published"] > 10
    lines = demo.index.read_text().splitlines(keepends=True)
    demo.index.write_text(lines[0])  # a bad deploy kept one line

    summary = run(demo, config)
    assert not summary["ok"] and absent_failures(summary) == [], summary["failures"]
    (failure,) = summary["failures"]
    assert failure["stage"] == "ledger" and failure["issuer"] == "issuing-ca" and failure["serial"] == ""
    gone = len(before) - (0 if lines[0].startswith("E") else 1)
    assert f"{GUARD} {gone} of {len(before)} scheduled" in failure["message"], failure["message"]
    assert "max_absent" in failure["message"] and "check the ledger sources" in failure["message"]
    assert scheduled_serials(demo) == before, "the guard let serials leave the schedule"

    with _session(demo, config, monkeypatch) as session:
        caught_up = session.catch_up()
        assert [GUARD in f.message for f in caught_up.failures] == [True], caught_up.failures
        due = _all_due(demo)
        tick = session.tick()
    assert tick.failures == [] and _rewritten(demo, due) == {int(s, 16) for s in before}


def test_an_emptied_index_with_the_limit_raised_forgets_every_serial(tmp_path):
    """The removal is meant (the operator raised the limit for one run): the
    serials leave the schedule, one failure each, as without the guard."""
    demo = build_demo(tmp_path, certs=4, precerts=1, revoke=1)
    config = with_sources(demo, INDEX)
    assert run(demo, config)["ok"]
    before = scheduled_serials(demo)
    demo.index.write_text("")
    guarded = run(demo, with_sources(demo, INDEX, "[sweep]\nmax_absent = 2\n"))
    assert [f["issuer"] for f in guard_failures(guarded)] == ["issuing-ca"] and len(guarded["failures"]) == 1
    assert f"{GUARD} {len(before)} of {len(before)} scheduled" in guarded["failures"][0]["message"]
    assert scheduled_serials(demo) == before

    raised = run(demo, with_sources(demo, INDEX, "[sweep]\nmax_absent_fraction = 1.0\n"))
    assert not raised["ok"] and guard_failures(raised) == []
    assert absent_failures(raised) == sorted(before) and len(raised["failures"]) == len(before)
    assert scheduled_serials(demo) == set()


def test_a_sqlite_ledger_swapped_for_an_empty_one_forgets_nothing(tmp_path):
    """A ledger restored from a backup made before any issuance: valid, but
    empty. Every record stays scheduled; the run fails naming the issuer."""
    demo = build_demo(tmp_path, certs=12, precerts=2, revoke=1)
    ingest(demo)
    config = with_sources(demo, SQLITE)
    assert run(demo, config)["ok"]
    before = scheduled_serials(demo)
    ledger = demo.root / "ledger.sqlite"
    ledger.unlink()
    connect(str(ledger)).close()  # created, empty, schema version 2
    summary = run(demo, config)
    assert not summary["ok"] and len(summary["failures"]) == 1, summary["failures"]
    assert guard_failures(summary)[0]["issuer"] == "issuing-ca"
    assert f"{GUARD} {len(before)} of {len(before)} scheduled" in summary["failures"][0]["message"]
    assert scheduled_serials(demo) == before


@pytest.mark.parametrize(("setting", "key"), [("max_absent = -1", "$.sweep.max_absent"),
                                               ("max_absent_fraction = 1.5", "$.sweep.max_absent_fraction"),
                                               ("max_absent_fraction = -0.1", "$.sweep.max_absent_fraction")])
def test_a_sweep_limit_out_of_range_is_a_config_error_naming_the_key(tmp_path, setting, key):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    config = with_sources(demo, INDEX, f"[sweep]\n{setting}\n")
    with pytest.raises(ConfigError, match=f"^{config}: " + key.replace("$", r"\$").replace(".", r"\.") + ":"):
        load_config(config)


def test_more_sqlite_sources_than_sqlite_attaches_at_once_are_swept(tmp_path):
    """12 sqlite ledgers: more than SQLite attaches to one connection (10,
    the journal included). A row deleted from the first and one from the
    last are swept; the serials every other ledger holds stay scheduled."""
    assert sqlite3.connect("").getlimit(sqlite3.SQLITE_LIMIT_ATTACHED) < 12 + 1
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    later = utc_now() + dt.timedelta(days=60)
    sources = []
    for n in range(12):
        write_entries(str(demo.root / f"ledger{n}.sqlite"), [
            LedgerEntry("issuing-ca", 0x9000 + 16 * n + i, Kind.CERTIFICATE, later, Status.GOOD, source="synthetic")
            for i in range(3)])
        sources.append(f'[[sources]]\ntype = "sqlite"\npath = "ledger{n}.sqlite"\n')
    config = with_sources(demo, "".join(sources))
    first = run(demo, config)
    assert first["ok"] and first["published"] == 36, first
    assert run(demo, config)["ok"]  # a complete pass with nothing absent: no failure

    gone = [0x9000, 0x9000 + 16 * 11 + 2]
    for serial, name in zip(gone, ("ledger0.sqlite", "ledger11.sqlite")):
        with sqlite3.connect(demo.root / name) as db:
            db.execute("DELETE FROM entries WHERE serial = ?", (serial_hex(serial),))
    summary = run(demo, config)
    assert not summary["ok"] and absent_failures(summary) == sorted(map(serial_hex, gone)), summary["failures"]
    assert len(summary["failures"]) == 2
    assert len(scheduled_serials(demo)) == 34
    assert run(demo, config)["ok"]


TAIL_GUARD = "the ledger's changes removed the rows of"


def test_refresh_reading_an_index_cut_short_forgets_nothing(tmp_path, monkeypatch):
    """While `refresh` runs, index.txt is cut to its first line: the index
    tail reads every other line as removed. Before, each left the schedule
    with a failure of its own; now the tick fails once, naming the issuer
    and the numbers, and nothing leaves the schedule. The index put back,
    the next ticks say nothing and routine re-signs every response."""
    demo = build_demo(tmp_path, certs=12, precerts=2, revoke=1)
    config = with_sources(demo, INDEX, REFRESH)
    assert run(demo, config)["ok"]
    before = scheduled_serials(demo)
    whole = demo.index.read_text()
    with _session(demo, config, monkeypatch) as session:
        assert session.catch_up().failures == []
        demo.index.write_text(whole.splitlines(keepends=True)[0])
        cut = session.tick()
        assert [(f.stage, f.serial) for f in cut.failures] == [("ledger", "")], cut.failures
        assert TAIL_GUARD in cut.failures[0].message and "'issuing-ca'" in cut.failures[0].message
        assert scheduled_serials(demo) == before, "the guard let serials leave the schedule"
        demo.index.write_text(whole)
        assert session.tick().failures == []
        due = _all_due(demo)
        tick = session.tick()
    assert tick.failures == [] and _rewritten(demo, due) == {int(s, 16) for s in before}


def test_an_incremental_run_reading_mass_deletions_forgets_nothing(tmp_path):
    """Rows of most serials deleted from a SQLite ledger (its change log
    says so): `run --incremental` fails once and forgets nothing (one row
    deleted is still one failure: test_pruned_rows.py)."""
    demo = build_demo(tmp_path, certs=12, precerts=2, revoke=1)
    ingest(demo)
    config = with_sources(demo, SQLITE)
    assert run(demo, config, "--incremental")["ok"]
    before = scheduled_serials(demo)
    doomed = sorted(before)[:-1]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        db.executemany("DELETE FROM entries WHERE serial = ?", [(s,) for s in doomed])
    summary = run(demo, config, "--incremental")
    assert summary["plan"] == "incremental" and not summary["ok"], summary
    (failure,) = summary["failures"]
    assert TAIL_GUARD in failure["message"] and f"{len(doomed)} of {len(before)} scheduled" in failure["message"]
    assert scheduled_serials(demo) == before
