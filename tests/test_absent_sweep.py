"""A serial the ledger no longer holds, or holds expired, must leave the
routine schedule whatever the source type ("never answer good for a
serial the ledger does not know").

Routine re-signing (`ocspmint refresh`, `run --incremental`) reads the
journal's schedule, not the ledger. Before, only configs whose sources
were all `sqlite` swept that schedule after a full pass: a line removed
from an `openssl ca` index.txt, or a certificate file removed from a
`certdir` source, stayed scheduled and was re-signed `good` for ever,
exit 0, and so was a certificate whose ledger notAfter moved into the
past (the journal kept the later one). Real components: `openssl ca`
databases and CRLs, SoftHSM2, the file store, the journal, the CLI and
the refresh Session.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from e2e import response_path
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, issue
from ocspmint.metrics import RefreshMetrics
from ocspmint.model import serial_hex
from ocspmint.refresh import Session
from ocspmint.report import Summary
from test_incremental import ingest, run, sqlite_config
from test_incremental_edges import backup, restore

ABSENT = "no longer in the ledger"


def openssl_hex(serial: int) -> str:
    text = format(serial, "X")
    return text if len(text) % 2 == 0 else "0" + text


def rewrite_index(demo: Demo, edit: Callable[[list[str]], list[str] | None]) -> None:
    """Rewrite index.txt line by line through a new file, as `openssl ca`
    does (new inode); ``edit(fields)`` returns the fields or None to drop."""
    lines = []
    for line in demo.index.read_text().splitlines():
        fields = edit(line.split("\t"))
        if fields is not None:
            lines.append("\t".join(fields))
    new = demo.index.with_name("index.txt.new")
    new.write_text("".join(f"{line}\n" for line in lines))
    os.replace(new, demo.index)


def drop_line(demo: Demo, serial: int) -> None:
    rewrite_index(demo, lambda f: None if f[3] == openssl_hex(serial) else f)


def crl(demo: Demo) -> Path:
    path = demo.root / "ca" / "issuing-ca.crl"
    subprocess.run(["openssl", "ca", "-config", str(demo.openssl_cnf), "-gencrl", "-out", str(path), "-batch"],
                   check=True, capture_output=True, cwd=demo.root / "ca")
    return path


def with_sources(demo: Demo, sources: str, extra: str = "") -> Path:
    """The demo's config with ``sources`` instead of its index.txt source;
    ``certs`` (a certdir source's folder) is a copy of ca/newcerts."""
    shutil.copytree(demo.certs_dir, demo.root / "certs", dirs_exist_ok=True)
    head, _, _ = demo.config.read_text().partition("[[sources]]")
    path = demo.root / "sources.toml"
    path.write_text(head + extra + sources)
    return path


INDEX = '[[sources]]\ntype = "openssl-index"\npath = "ca/index.txt"\ncerts_dir = "ca/newcerts"\nissuer = "issuing-ca"\n'
SQLITE = '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n'


def certdir(crl_path: Path) -> str:
    return f'[[sources]]\ntype = "certdir"\npath = "certs"\ncrls = ["{crl_path}"]\n'


def scheduled(demo: Demo, serial: int) -> tuple[int | None, int | None]:
    """(refresh_at, not_after) of the serial's journal record."""
    with sqlite3.connect(demo.root / "state" / "journal.sqlite", timeout=10) as db:
        (row,) = db.execute("SELECT refresh_at, not_after FROM published WHERE serial = ?", (serial_hex(serial),))
    return row


def journal_sql(demo: Demo, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(demo.root / "state" / "journal.sqlite", timeout=10) as db:
        return db.execute(sql, args).fetchall()


def absent_failures(summary: dict) -> list[str]:
    return sorted(f["serial"] for f in summary["failures"] if f["stage"] == "ledger" and ABSENT in f["message"])


def test_a_line_removed_from_index_txt_leaves_the_schedule_at_the_next_full_run(tmp_path):
    """Before: the run after the removal was ok (exit 0) and the serial
    stayed scheduled, re-signed `good` by every routine refresh."""
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=1)
    assert run(demo, demo.config)["ok"]
    gone = demo.serials["good"][0]
    drop_line(demo, gone)
    summary = run(demo, demo.config)  # exit 1 (``run`` checks the code against ``ok``)
    assert not summary["ok"]
    (failure,) = summary["failures"]
    assert failure["stage"] == "ledger" and failure["issuer"] == "issuing-ca" and failure["serial"] == serial_hex(gone)
    assert ABSENT in failure["message"]
    assert scheduled(demo, gone) == (None, None)
    assert run(demo, demo.config)["ok"]  # reported once: no longer scheduled


def test_a_certificate_file_removed_from_a_certdir_source_leaves_the_schedule(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=1)
    config = with_sources(demo, certdir(crl(demo)))
    assert run(demo, config)["ok"]
    gone = demo.serials["precert"][0]
    (demo.root / "certs" / f"{openssl_hex(gone)}.pem").unlink()
    summary = run(demo, config)
    assert not summary["ok"] and absent_failures(summary) == [serial_hex(gone)] and len(summary["failures"]) == 1
    assert scheduled(demo, gone) == (None, None)
    assert run(demo, config)["ok"]


def test_a_mixed_config_sweeps_what_no_source_holds_and_keeps_what_one_still_does(tmp_path):
    """sqlite + openssl-index + certdir: a serial gone from all three is
    absent; one gone from two of them is still held by the third. Before,
    a config with any source not `sqlite` was not swept at all."""
    demo = build_demo(tmp_path, certs=4, precerts=1, revoke=1)
    ingest(demo)
    config = with_sources(demo, SQLITE + INDEX + certdir(crl(demo)))
    assert run(demo, config)["ok"]
    everywhere, in_sqlite, in_files = demo.serials["good"][:3]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        db.executemany("DELETE FROM entries WHERE serial = ?", [(serial_hex(everywhere),), (serial_hex(in_files),)])
    for serial in (everywhere, in_sqlite):
        drop_line(demo, serial)
        (demo.root / "certs" / f"{openssl_hex(serial)}.pem").unlink()
    summary = run(demo, config)
    assert not summary["ok"] and absent_failures(summary) == [serial_hex(everywhere)], summary["failures"]
    assert len(summary["failures"]) == 1
    assert scheduled(demo, everywhere) == (None, None)
    for held in (in_sqlite, in_files):
        assert scheduled(demo, held)[0] is not None, "a serial one source still holds left the schedule"
    assert run(demo, config)["ok"]


def test_a_pass_with_a_source_unusable_does_not_sweep_and_the_next_complete_one_does(tmp_path):
    """The CRL of the certdir source is missing: the pass is incomplete
    (nothing from any source is published), and what it did not read is
    not absent. Once the source is whole, the removed serial is swept."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    crl_path = crl(demo)
    config = with_sources(demo, INDEX + certdir(crl_path))
    assert run(demo, config)["ok"]
    gone = demo.serials["good"][1]
    drop_line(demo, gone)
    (demo.root / "certs" / f"{openssl_hex(gone)}.pem").unlink()
    crl_path.rename(crl_path.with_suffix(".away"))
    broken = run(demo, config)
    assert not broken["ok"] and absent_failures(broken) == [], broken["failures"]
    assert scheduled(demo, gone)[0] is not None, "an incomplete pass swept what it did not read"
    crl_path.with_suffix(".away").rename(crl_path)
    summary = run(demo, config)
    assert not summary["ok"] and absent_failures(summary) == [serial_hex(gone)], summary["failures"]
    assert scheduled(demo, gone) == (None, None)


def _failures(summary: Summary) -> dict:
    """The ``failures`` of a Summary as `run --json` gives them."""
    return {"failures": [{"stage": f.stage, "serial": f.serial, "message": f.message} for f in summary.failures]}


def _session(demo: Demo, config: Path, monkeypatch) -> Session:
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    return Session(load_config(config), RefreshMetrics(""), lambda: False)


def _all_due(demo: Demo) -> dict[str, bytes]:
    """Make every scheduled record due now; the stored responses as they are."""
    journal_sql(demo, "UPDATE published SET refresh_at = 0 WHERE refresh_at IS NOT NULL")
    time.sleep(1.1)  # producedAt is in whole seconds: a re-signed response differs
    return {s: response_path(demo, int(s, 16)).read_bytes() for (s,) in journal_sql(demo, "SELECT serial FROM published")}


def _rewritten(demo: Demo, before: dict[str, bytes]) -> set[int]:
    return {int(s, 16) for s, data in before.items() if response_path(demo, int(s, 16)).read_bytes() != data}


def test_refresh_stops_re_signing_index_serials_removed_before_and_while_it_runs(tmp_path, monkeypatch):
    """A line removed while refresh was stopped is swept by its catch-up
    pass; one removed while it runs is reported by the index tail. Before,
    both were re-signed `good` at every refresh time, and nothing was
    reported."""
    demo = build_demo(tmp_path, certs=4, precerts=0, revoke=0)
    config = with_sources(demo, INDEX, '[refresh]\nmetrics_listen = ""\n')
    assert run(demo, config)["ok"]
    before_start, while_running, *kept = demo.serials["good"]
    drop_line(demo, before_start)
    with _session(demo, config, monkeypatch) as session:
        caught_up = session.catch_up()
        assert absent_failures(_failures(caught_up)) == [serial_hex(before_start)], caught_up.failures
        drop_line(demo, while_running)
        before = _all_due(demo)
        tick = session.tick()
    assert [(f.stage, f.serial) for f in tick.failures] == [("ledger", serial_hex(while_running))]
    assert "no longer in the index" in tick.failures[0].message
    assert _rewritten(demo, before) == set(kept), "a serial no longer in the ledger was re-signed"
    assert scheduled(demo, before_start) == (None, None) and scheduled(demo, while_running) == (None, None)


def test_refresh_stops_re_signing_a_certificate_removed_from_a_certdir_source_while_it_runs(tmp_path, monkeypatch):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    config = with_sources(demo, certdir(crl(demo)), '[refresh]\nmetrics_listen = ""\n')
    assert run(demo, config)["ok"]
    gone = demo.serials["good"][0]
    with _session(demo, config, monkeypatch) as session:
        assert session.catch_up().failures == []
        (demo.root / "certs" / f"{openssl_hex(gone)}.pem").unlink()
        before = _all_due(demo)
        tick = session.tick()
    assert [(f.stage, f.serial) for f in tick.failures] == [("ledger", serial_hex(gone))]
    assert "any more" in tick.failures[0].message
    assert gone not in _rewritten(demo, before) and len(_rewritten(demo, before)) == len(before) - 1
    assert scheduled(demo, gone) == (None, None)


def test_a_sqlite_not_after_moved_into_the_past_leaves_the_incremental_schedule(tmp_path):
    """Before: the expired entry was skipped without reading its record;
    the journal kept the later notAfter and `run --incremental`'s routine
    re-signed the expired certificate at every refresh time."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["ok"]
    moved = demo.serials["good"][0]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        db.execute("UPDATE entries SET not_after = strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '-1 hour') WHERE serial = ?",
                   (serial_hex(moved),))
        (ledger_not_after,), = db.execute("SELECT strftime('%s', not_after) FROM entries WHERE serial = ?",
                                          (serial_hex(moved),))
    summary = run(demo, config, "--incremental")
    assert summary["ok"] and summary["plan"] == "incremental" and summary["expired"] == 1, summary
    assert scheduled(demo, moved) == (None, int(ledger_not_after))
    before = _all_due(demo)
    routine = run(demo, config, "--incremental")
    assert routine["ok"] and routine["due"] == {"refresh": len(before) - 1}, routine
    assert moved not in _rewritten(demo, before)


def test_an_index_not_after_moved_into_the_past_leaves_the_schedule(tmp_path, monkeypatch):
    """index.txt: a row's expiry set to an hour ago, its certificate file
    pruned (an expired row needs none). The full run's sweep, and the
    refresh tick that reads the changed line, retire the record with the
    ledger's notAfter. Before, the journal kept the later notAfter and
    routine re-signed it."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    config = with_sources(demo, INDEX, '[refresh]\nmetrics_listen = ""\n')
    assert run(demo, config)["ok"]
    by_run, by_tick, _ = demo.serials["good"]
    past = time.time() - 3600
    expiry = time.strftime("%y%m%d%H%M%SZ", time.gmtime(past))

    def expire(serial: int) -> None:
        rewrite_index(demo, lambda f: [f[0], expiry, *f[2:]] if f[3] == openssl_hex(serial) else f)
        (demo.certs_dir / f"{openssl_hex(serial)}.pem").unlink()

    expire(by_run)
    summary = run(demo, config)
    assert summary["ok"] and summary["failures"] == [], summary
    assert scheduled(demo, by_run) == (None, int(past))
    with _session(demo, config, monkeypatch) as session:
        assert session.catch_up().failures == []
        expire(by_tick)
        before = _all_due(demo)
        tick = session.tick()
    assert tick.failures == [] and by_tick not in _rewritten(demo, before), "re-signed an expired certificate"
    assert scheduled(demo, by_tick) == (None, int(past))


def test_refresh_sweeps_after_rereading_a_sqlite_ledger_restored_from_a_backup(tmp_path, monkeypatch):
    """A SQLite ledger put back from a backup made before a certificate
    was issued: its change log no longer continues from where `refresh`
    read, so the source is read whole (`ledger_reread`), and the serial
    the backup lacks, which no change ever reported deleted, leaves the
    schedule as a ledger failure naming it. Before, only a restart or a
    reload swept it, and routine re-signed it `good` until then."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    ingest(demo)
    db = demo.root / "ledger.sqlite"
    backup(db, tmp_path / "backup.sqlite")
    later = issue(demo)
    ingest(demo)
    config = with_sources(demo, SQLITE, '[refresh]\nmetrics_listen = ""\n')
    assert run(demo, config)["ok"]
    assert scheduled(demo, later)[0] is not None
    with _session(demo, config, monkeypatch) as session:
        assert session.catch_up().failures == []
        restore(tmp_path / "backup.sqlite", db)
        before = _all_due(demo)
        tick = session.tick()
    assert absent_failures(_failures(tick)) == [serial_hex(later)], tick.failures
    assert scheduled(demo, later) == (None, None)
    assert later not in _rewritten(demo, before) and _rewritten(demo, before), "re-signed a serial the ledger lacks"
