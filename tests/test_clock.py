"""Clock faults, with the process clock moved by libfaketime (Debian
`faketime`): a clock that jumped backwards since the last run, or while the
refresh service runs, is detected and reported, and nothing is signed with
it; a response never carries a thisUpdate in the future."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time

from cryptography.x509 import ocsp

from e2e import BIN, response_path, run_json
from ocspmint.demo import build_demo

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def faked(offset: str, **extra: str) -> dict[str, str]:
    """libfaketime settings: the clock runs ``offset`` ("+2d", "-1h") from real time."""
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1", **extra}


def test_a_clock_behind_the_last_run_is_refused_and_nothing_is_signed(tmp_path):
    demo = build_demo(tmp_path, certs=4, precerts=1, revoke=1)
    code, ahead = run_json(demo, env=faked("+2d"))
    assert code == 0 and ahead["published"] == 5, ahead
    serial = demo.serials["good"][0]
    before = response_path(demo, serial).read_bytes()
    code, now = run_json(demo)  # real time: two days behind what the journal recorded
    assert code == 1 and now["published"] == 0, now
    assert [f["stage"] for f in now["failures"]] == ["clock"]
    assert "jumped backwards" in now["failures"][0]["message"]
    assert response_path(demo, serial).read_bytes() == before


def test_this_update_is_never_in_the_future(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=1)
    code, summary = run_json(demo)
    assert code == 0, summary
    now = dt.datetime.now(dt.timezone.utc)
    for serial in demo.serials["good"] + demo.serials["precert"]:
        response = ocsp.load_der_ocsp_response(response_path(demo, serial).read_bytes())
        assert response.this_update_utc <= response.produced_at_utc <= now


def test_refresh_service_reports_a_backwards_jump_while_running(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    demo.config.write_text(demo.config.read_text() + '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    offset = tmp_path / "faketime.rc"
    offset.write_text("+0\n")
    env = {**demo.env(), **faked("", FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1")}
    del env["FAKETIME"]
    log = tmp_path / "refresh.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "ocspmint"), "refresh", "--config", str(demo.config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while b"caught_up" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        offset.write_text("-1h\n")
        while b'"clock"' not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    clock = [e for e in events if e["event"] == "clock"]
    assert clock and "jumped backwards" in clock[0]["error"], log.read_text()
