"""`ocspmint refresh` against real components (an `openssl ca` database,
a SQLite ledger, SoftHSM2, the file store), for what `ocspmint run`
already did and the service did not:

- a serial two ledger sources state differently is not published by the
  catch-up pass, nor at a later tick while the conflict lasts, and is
  published once the sources agree (as `run` excludes it: ``Plan._pass``);
- ``ocspmint_earliest_next_update_seconds{issuer}``: the earliest
  nextUpdate still scheduled, read from the /metrics endpoint;
- an entry whose certificate expired before its batch's producedAt is
  counted expired, never signed nor journaled (``Runner.make_batch``).

No timing assertions: each test waits for log lines, journal rows or
metric values.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections import Counter

from cdn import free_port
from e2e import openssl_check, response_path
from faultkit import wait_for
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, issue
from ocspmint.ledger.sqlite import write_entries
from ocspmint.metrics import RefreshMetrics
from ocspmint.model import Kind, LedgerEntry, Reason, Status, utc_now
from ocspmint.refresh import Session
from ocspmint.report import Summary
from test_refresh_faults import configure, refresh  # the service in a child process, its log and journal

ISSUER = "issuing-ca"


def state(demo: Demo, serial: int, status: Status, reason: Reason | None = None) -> None:
    """Write ``serial``'s row of the demo's second ledger, ``second.sqlite``."""
    revoked = None if status is Status.GOOD else utc_now().replace(microsecond=0) - dt.timedelta(hours=1)
    write_entries(str(demo.root / "second.sqlite"), [LedgerEntry(
        ISSUER, serial, Kind.CERTIFICATE, utc_now() + dt.timedelta(days=20), status, revoked, reason, "test")])


SECOND = '\n[[sources]]\ntype = "sqlite"\npath = "second.sqlite"\n'


def test_a_serial_two_sources_state_differently_is_never_published_while_they_do(tmp_path):
    """index.txt says good, a SQLite ledger says revoked: the catch-up pass
    publishes every other serial, and nothing for this one but a ledger
    failure naming it; a later change of one source that keeps the
    conflict publishes nothing either; once both say good, it is published."""
    demo = build_demo(tmp_path / "demo", certs=3, precerts=0, revoke=0)
    victim, others = demo.serials["good"][0], demo.serials["good"][1:]
    state(demo, victim, Status.REVOKED, Reason.keyCompromise)
    configure(demo, SECOND + '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    with refresh(demo, tmp_path / "refresh.log") as svc:
        [first] = wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        assert first["published"] == len(others), first
        assert [svc.row(s) for s in others] == [("good", "new")] * len(others)
        assert svc.row(victim) is None and not response_path(demo, victim).exists()
        [failure] = svc.failures_of(victim)
        assert failure["stage"] == "ledger" and "stated differently" in failure["message"], failure
        # the SQLite row changes, still revoked: its tail reports it, the index still says good
        state(demo, victim, Status.REVOKED, Reason.superseded)
        later = issue(demo, precert=True)  # read from index.txt at a tick after the SQLite change
        wait_for(lambda: svc.row(later) == ("good", "new"), "a precertificate issued after the change")
        wait_for(lambda: len(svc.failures_of(victim)) >= 2, "the conflict reported again at the tick")
        assert svc.row(victim) is None and not response_path(demo, victim).exists()
        assert all(e["stage"] == "ledger" for e in svc.failures_of(victim))
        # both sources say good now: published at the tick that reads the change
        state(demo, victim, Status.GOOD)
        wait_for(lambda: svc.row(victim) == ("good", "new"), "the serial, once the sources agree")
        assert svc.stop() == 0
    assert openssl_check(demo, response_path(demo, victim), victim).status == "good"
    assert "Traceback" not in svc.log.read_text()


def test_the_earliest_next_update_still_scheduled_is_a_metric(tmp_path):
    """One response whose nextUpdate was cut back (as when the signer
    certificate expires before thisUpdate + validity): the gauge says when
    it expires, not the oldest thisUpdate's nextUpdate."""
    demo = build_demo(tmp_path / "demo", certs=3, precerts=0, revoke=0)
    metrics = free_port()
    configure(demo, f'\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = "127.0.0.1:{metrics}"\n')
    with refresh(demo, tmp_path / "first.log") as svc:  # publishes every serial, then stops
        wait_for(lambda: svc.events("caught_up"), "the first catch-up pass")
        assert svc.stop() == 0
    cut = f"{demo.serials['good'][1]:040x}"
    [(this_update, latest)] = svc.journal("SELECT min(this_update), max(next_update) FROM published")
    svc.journal("UPDATE published SET next_update = ? WHERE serial = ?", this_update + 2 * 86400, cut)
    with refresh(demo, tmp_path / "refresh.log", metrics=metrics) as svc:
        wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        assert svc.row(int(cut, 16)) == ("good", "new"), "the cut-back response was not re-signed"
        name = f'ocspmint_earliest_next_update_seconds{{issuer="{ISSUER}"}}'
        earliest = wait_for(lambda: svc.metrics().get(name), name)
        assert earliest == this_update + 2 * 86400 < latest
        assert svc.stop() == 0


def test_an_entry_expired_by_its_batch_is_counted_expired_and_not_published(tmp_path, monkeypatch):
    """A plan judged expiry at its start; a certificate's notAfter passed
    before its batch was encoded: that entry is counted expired, not
    signed, stored nor journaled, and is no failure; the other entry of
    the batch is published. In-process (the plan is handed to the
    Session's signing step as a long pass would hand it over)."""
    demo = build_demo(tmp_path / "demo", certs=1, precerts=0, revoke=0)
    configure(demo, '\n[refresh]\nmetrics_listen = ""\n')
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    now = utc_now()
    late, fresh = (LedgerEntry(ISSUER, serial, Kind.CERTIFICATE, not_after, Status.GOOD, source="test")
                   for serial, not_after in ((0x7E57_01, now - dt.timedelta(seconds=1)),
                                             (0x7E57_02, now + dt.timedelta(days=20))))
    with Session(load_config(demo.config), RefreshMetrics(""), lambda: False) as session:
        session.catch_up()
        summary = Summary(started=now)
        session._sign([(late, "new"), (fresh, "new")], summary, Counter({"new": 2}))
    assert (summary.published, summary.due, summary.expired, summary.failures) == (1, {"new": 1}, 1, []), summary
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:
        rows = db.execute("SELECT serial FROM published WHERE serial IN (?, ?)",
                          (f"{late.serial:040x}", f"{fresh.serial:040x}")).fetchall()
    assert rows == [(f"{fresh.serial:040x}",)]
    assert response_path(demo, fresh.serial).exists() and not response_path(demo, late.serial).exists()
