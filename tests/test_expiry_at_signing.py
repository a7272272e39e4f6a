"""A full pass judges expiry when it starts; on a big ledger signing may
come hours later. An entry whose certificate expired in between must not
be signed: it is counted expired, as the planner counts one expired at its
start (neither signed, stored, journaled nor a failure). Before, `run` and
`reissue` signed it (only `refresh` checked at batch time). Real
components: a SQLite ledger ingested from `openssl ca`, SoftHSM2, the file
store, the journal.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

from e2e import response_path
from ocspmint import pipeline
from ocspmint.config import load_config
from ocspmint.demo import build_demo
from ocspmint.model import serial_hex
from ocspmint.planner import Planner
from test_incremental import ingest, sqlite_config


def test_an_entry_expired_between_plan_start_and_its_batch_is_counted_expired_not_signed(tmp_path, monkeypatch):
    """The plan's clock is set an hour back, as if the pass had started an
    hour before signing; one certificate's notAfter lies between the two."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    ingest(demo)
    late = demo.serials["good"][0]
    with sqlite3.connect(demo.root / "ledger.sqlite") as db:
        db.execute("UPDATE entries SET not_after = strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '-30 minutes') "
                   "WHERE serial = ?", (serial_hex(late),))
    make_planner = pipeline.make_planner

    def started_an_hour_ago(*args: object, **kwargs: object) -> Planner:
        planner = make_planner(*args, **kwargs)  # type: ignore[arg-type]
        planner.now -= dt.timedelta(hours=1)
        return planner

    monkeypatch.setattr(pipeline, "make_planner", started_an_hour_ago)
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    summary = pipeline.run(load_config(sqlite_config(demo)), show_progress=False)
    expired = len(demo.serials["expired"]) + 1  # the demo's long-expired certificate, and this one
    assert (summary.ok, summary.failures, summary.expired, summary.due, summary.published) == \
        (True, [], expired, {"new": 2}, 2), summary
    assert not response_path(demo, late).exists(), "signed a certificate past its notAfter"
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:
        assert db.execute("SELECT count(*) FROM published WHERE serial = ?", (f"{late:040x}",)).fetchone() == (0,)
    for serial in demo.serials["good"][1:]:
        assert response_path(demo, serial).exists()
