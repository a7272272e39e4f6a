"""A CA may prune the ledger rows of expired certificates (index.txt lines
of status E, rows deleted from a SQLite ledger). Nothing of them is served
or scheduled, so their removal is no failure; before, the index tail and
the SQLite change log reported each as a ledger failure (exit 1, one
`failure` line and `ocspmint_failed_total` per serial), as for a row of a
valid certificate deleted. Real components: `openssl ca` index.txt,
SoftHSM2, the file store, the journal, the CLI and the refresh Session.
"""

from __future__ import annotations

import sqlite3

from ocspmint.model import serial_hex
from ocspmint.demo import build_demo
from test_absent_sweep import INDEX, _session, drop_line, with_sources
from test_incremental import ingest, run, sqlite_config


def test_refresh_takes_an_expired_line_pruned_from_index_txt_silently(tmp_path, monkeypatch):
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    config = with_sources(demo, INDEX, '[refresh]\nmetrics_listen = ""\n')
    assert run(demo, config)["ok"]
    (expired,) = demo.serials["expired"]
    valid = demo.serials["good"][0]
    with _session(demo, config, monkeypatch) as session:
        assert session.catch_up().failures == []
        drop_line(demo, expired)
        assert session.tick().failures == [], "an expired certificate's pruned line was a failure"
        drop_line(demo, valid)  # a valid certificate's line removed is still reported
        tick = session.tick()
    assert [(f.stage, f.serial) for f in tick.failures] == [("ledger", serial_hex(valid))]


def test_an_incremental_run_takes_an_expired_row_deleted_from_a_sqlite_ledger_silently(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["ok"]
    (expired,) = demo.serials["expired"]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        assert db.execute("DELETE FROM entries WHERE serial = ?", (serial_hex(expired),)).rowcount == 1
    summary = run(demo, config, "--incremental")
    assert summary["plan"] == "incremental" and summary["ok"] and summary["failures"] == [], summary
    valid = demo.serials["good"][0]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        db.execute("DELETE FROM entries WHERE serial = ?", (serial_hex(valid),))
    summary = run(demo, config, "--incremental")
    assert [(f["stage"], f["serial"]) for f in summary["failures"]] == [("ledger", serial_hex(valid))], summary
