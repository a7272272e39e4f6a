"""Recovery from a clock that ran fast and was corrected (`ocspmint reissue
--clock-was-fast`, docs/faults.md), with the process clock moved by
libfaketime as in test_clock.py: the default refusal stays, the operator's
explicit option accepts the clock, logs it, and re-signs every response
dated in the future; an interrupted recovery resumes."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing

from cryptography.x509 import ocsp

from e2e import BIN, ocspmint, openssl_check, response_path, run_json
from ocspmint.demo import Demo, build_demo
from test_clock import faked


def journal(demo: Demo, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(demo.root / "state" / "journal.sqlite")) as db:
        return db.execute(sql).fetchall()


def future_dated(demo: Demo) -> int:
    now = int(time.time()) + 2
    return journal(demo, f"SELECT count(*) FROM published WHERE produced_at > {now} OR this_update > {now}")[0][0]


def all_serials(demo: Demo) -> list[int]:
    return sorted(set(demo.serials["good"] + demo.serials["precert"] + demo.serials["revoked"]))


def test_a_clock_that_ran_fast_is_refused_until_the_operator_accepts_it_then_everything_is_re_signed(tmp_path):
    demo = build_demo(tmp_path, certs=4, precerts=1, revoke=1)
    code, ahead = run_json(demo, env=faked("+2d"))
    assert code == 0 and ahead["published"] == 5, ahead
    assert future_dated(demo) == 5
    recorded = journal(demo, "SELECT value FROM meta WHERE key = 'clock'")

    # the default refusal stays, for run and for a plain reissue, and names the way out
    code, summary = run_json(demo)
    assert code == 1 and [f["stage"] for f in summary["failures"]] == ["clock"], summary
    assert "jumped backwards" in summary["failures"][0]["message"]
    assert "reissue --clock-was-fast" in summary["failures"][0]["message"]
    p = ocspmint(demo, "reissue", "--all", "--reason", "clock was fast", "--json", "--quiet")
    assert p.returncode == 1 and [f["stage"] for f in json.loads(p.stdout)["summary"]["failures"]] == ["clock"]
    p = ocspmint(demo, "reissue", "--clock-was-fast", "--all", "--reason", "x")
    assert p.returncode == 2 and "--clock-was-fast selects the responses dated in the future itself" in p.stderr

    before = {s: response_path(demo, s).read_bytes() for s in all_serials(demo)}
    assert len(before) == 5
    p = ocspmint(demo, "reissue", "--clock-was-fast", "--reason", "NTP fixed", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    dry = json.loads(p.stdout)
    assert dry["due"] == {"forced": 5} and dry["clock"]["future_dated"] == 5 and not dry["clock"]["accepted"], dry
    assert journal(demo, "SELECT value FROM meta WHERE key = 'clock'") == recorded, "the dry run changed the clock"
    assert {s: response_path(demo, s).read_bytes() for s in before} == before

    p = ocspmint(demo, "reissue", "--clock-was-fast", "--reason", "NTP fixed, ticket 7", "--json", "--quiet")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["summary"]["published"] == 5 and out["summary"]["due"] == {"forced": 5}, out
    assert out["clock"]["accepted"] and out["clock"]["future_dated"] == 5 and out["clock"]["left"] == 0, out["clock"]
    assert "accepted as right" in p.stderr and "clock_resets" in p.stderr and "NTP fixed, ticket 7" in p.stderr

    now = dt.datetime.now(dt.timezone.utc)
    for serial in before:
        der = response_path(demo, serial).read_bytes()
        assert der != before[serial]
        response = ocsp.load_der_ocsp_response(der)
        assert response.this_update_utc <= response.produced_at_utc <= now, serial
        assert openssl_check(demo, response_path(demo, serial), serial).verified
    assert future_dated(demo) == 0
    (at, old, reason), = journal(demo, "SELECT at, recorded, reason FROM clock_resets")
    assert (str(old), reason) == (recorded[0][0], f"reissue {out['job']}: NTP fixed, ticket 7")
    assert abs(at - now.timestamp()) < 60
    assert journal(demo, f"SELECT finished IS NOT NULL FROM jobs WHERE id = {out['job']}") == [(1,)]

    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == 0, summary
    assert ocspmint(demo, "audit", "--quiet").returncode == 0
    p = ocspmint(demo, "reissue", "--clock-was-fast", "--reason", "again")
    assert p.returncode == 0 and "nothing to recover" in p.stdout, p.stdout + p.stderr
    assert len(journal(demo, "SELECT * FROM clock_resets")) == 1


def test_an_interrupted_recovery_fails_run_until_it_is_resumed(tmp_path):
    demo = build_demo(tmp_path, certs=16, precerts=0, revoke=0)
    code, ahead = run_json(demo, env=faked("+1d"))
    assert code == 0 and ahead["published"] == 16, ahead
    args = [str(BIN / "ocspmint"), "reissue", "--clock-was-fast", "--reason", "NTP fixed", "--rate", "4", "--quiet",
            "--config", str(demo.config)]
    proc = subprocess.Popen(args, env=demo.env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while future_dated(demo) > 12 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = future_dated(demo)
    assert 0 < left <= 12, "the rate (4/s) should have left some for the resumed job"
    assert len(journal(demo, "SELECT * FROM clock_resets")) == 1
    job, = journal(demo, "SELECT id FROM jobs WHERE finished IS NULL")

    # the clock was accepted: run signs again, but says the recovery is not finished
    code, summary = run_json(demo)
    assert code == 1 and [f["stage"] for f in summary["failures"]] == ["clock"], summary
    assert f"reissue job {job[0]} (--clock-was-fast: NTP fixed) is not finished" in summary["failures"][0]["message"]

    p = ocspmint(demo, "reissue", "--clock-was-fast", "--reason", "NTP fixed", "--json", "--quiet")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    out = json.loads(p.stdout)
    assert out["resumed"] and out["job"] == job[0] and out["summary"]["published"] == left, out
    assert not out["clock"]["accepted"] and out["clock"]["left"] == 0, out["clock"]
    assert future_dated(demo) == 0
    code, summary = run_json(demo)
    assert code == 0 and summary["ok"], summary
