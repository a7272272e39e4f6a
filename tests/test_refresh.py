"""`ocspmint refresh`, the continuous service, against a real `openssl ca`
database, SoftHSM2 and an `ocspmint serve` origin as its purge target.

The module's tests share one running service and run in file order:
catch-up, a new precertificate, a revocation, routine re-signing,
metrics, SIGHUP, SIGTERM. Faults (a pulled token, a store that cannot
write a serial, dead purge targets, unusable reloads, a clock behind) are
in tests/test_refresh_faults.py.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cdn import free_port, serve
from e2e import BIN, ocspmint, openssl_check, response_path
from faultkit import wait_for
from ocspmint.demo import Demo, build_demo, issue, revoke
from ocspmint.planner import refresh_at

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SETTINGS = """
[response]
refresh_after = "PT20S"
backdate = "PT0S"

[refresh]
tick = "PT0.5S"
metrics_listen = "127.0.0.1:{metrics}"

[[purge]]
name = "origin"
type = "http"
urls = ["{origin}"]
"""


@dataclass
class Service:
    demo: Demo
    proc: subprocess.Popen
    log: Path
    metrics: int

    def events(self, name: str) -> list[dict]:
        return [e for line in self.log.read_text().splitlines() if line.startswith("{")
                for e in [json.loads(line)] if e["event"] == name]

    def journal(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.demo.root / "state" / "journal.sqlite", timeout=10) as db:
            return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("refresh")
    demo = build_demo(tmp / "demo", certs=10, precerts=3, revoke=2)
    port, metrics = free_port(), free_port()
    (demo.root / "responses").mkdir()  # serve wants the store folder to exist
    with serve(demo.config, tmp, port, demo.env()) as origin:
        demo.config.write_text(demo.config.read_text() + SETTINGS.format(metrics=metrics, origin=origin))
        log = tmp / "refresh.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(BIN / "ocspmint"), "refresh", "--config", str(demo.config)],
                                    stdout=out, stderr=subprocess.STDOUT, env=demo.env())
        svc = Service(demo, proc, log, metrics)
        try:
            wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
            yield svc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_catch_up_publishes_every_unexpired_ledger_entry(service):
    first = service.events("caught_up")[0]
    assert first["failures"] == 0 and first["published"] == 13, first  # 10 certs + 3 precerts; not the expired one
    assert service.journal("SELECT count(*) FROM published") == [(13,)]


def test_new_precertificate_is_published_within_seconds(service):
    serial = issue(service.demo, precert=True)
    path = response_path(service.demo, serial)
    wait_for(path.exists, f"a response for new precertificate {serial:#x}", timeout=30)
    view = openssl_check(service.demo, path, serial)
    assert view.verified and view.status == "good"
    assert service.journal(f"SELECT why FROM published WHERE serial = '{serial:040x}'") == [("new",)]


def test_revocation_is_resigned_and_purged_at_once(service):
    serial = service.demo.serials["good"][0]
    revoke(service.demo, serial, "keyCompromise")
    path = response_path(service.demo, serial)
    wait_for(lambda: openssl_check(service.demo, path, serial).status == "revoked", "the revoked response", 30)
    assert openssl_check(service.demo, path, serial).reason == "keyCompromise"
    assert service.journal(f"SELECT why FROM published WHERE serial = '{serial:040x}'") == [("changed",)]
    wait_for(lambda: service.journal("SELECT count(*) FROM purges") == [(0,)], "the purge to be acknowledged", 30)


def test_routine_refresh_re_signs_everything_spread_over_ticks(service):
    started = int(time.time())
    # refresh_after 20 s: every response comes due between 10 and 20 s after its thisUpdate.
    wait_for(lambda: service.journal(f"SELECT count(*) FROM published WHERE this_update < {started}") == [(0,)],
             "every response to be re-signed", timeout=60)
    assert service.journal("SELECT count(*) FROM published WHERE why = 'refresh'")[0][0] >= 10
    ticks = [e for e in service.events("tick") if e["due"].get("refresh")]
    assert len(ticks) >= 3, "routine re-signing came as one burst, not spread over ticks"


def test_refresh_times_spread_evenly_and_never_pass_the_refresh_point():
    period = dt.timedelta(days=3)
    not_after = START + dt.timedelta(days=90)
    for serials in (range(1, 10_001), [(n * 7919) << 64 for n in range(1, 10_001)]):
        times = [refresh_at(START, START + dt.timedelta(days=7), s, period, not_after) for s in serials]
        assert all(START + period / 2 <= t <= START + period for t in times)
        bins = Counter(int((t - START - period / 2) / (period / 20)) for t in times)
        assert all(850 <= bins[b] <= 1150 for b in range(10)), bins  # 1,000 expected per bin
    expires = START + dt.timedelta(days=1)  # before the refresh time: come due at notAfter, to be retired
    assert refresh_at(START, START + dt.timedelta(days=7), 5, period, expires) == expires
    cut_back = START + dt.timedelta(days=2)  # nextUpdate cut back to the signer's notAfter: at least 8 h before it
    assert all(refresh_at(START, cut_back, s, period, not_after) <= cut_back - dt.timedelta(hours=8) for s in range(1, 1000))


def test_metrics_report_due_published_latency_and_staleness(service):
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics}/metrics", timeout=5).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['ocspmint_published_total{issuer="issuing-ca"}'] >= 15
    assert values['ocspmint_due_total{reason="new"}'] >= 14
    assert values['ocspmint_due_total{reason="changed"}'] >= 1
    assert values['ocspmint_due_total{reason="refresh"}'] >= 10
    assert values["ocspmint_ledger_to_published_seconds_count"] >= 2  # the precertificate and the revocation
    assert values["ocspmint_sign_batch_seconds_count"] >= 3
    assert values["ocspmint_upload_batch_seconds_count"] >= 3
    oldest = values['ocspmint_oldest_this_update_seconds{issuer="issuing-ca"}']
    assert time.time() - 120 < oldest <= time.time()
    assert values["ocspmint_ledger_changes_pending"] == 0  # everything the ledger said is published
    assert values['ocspmint_purges_pending{target="origin"}'] == 0  # the revocation's purge was acknowledged


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(service):
    good = service.demo.config.read_text()
    service.demo.config.write_text(good + "\nnot_a_key = 1\n")
    service.proc.send_signal(signal.SIGHUP)
    failed = wait_for(lambda: service.events("reload_failed"), "the reload to be refused")
    assert "not_a_key" in failed[0]["error"]
    assert service.proc.poll() is None
    service.demo.config.write_text(good)
    service.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: service.events("reloaded") and len(service.events("caught_up")) == 2, "the reload")
    assert service.proc.poll() is None


def test_sigterm_stops_gracefully_with_a_consistent_journal(service):
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0
    assert service.events("stopped")
    assert "Traceback" not in service.log.read_text()
    check = ocspmint(service.demo, "verify")
    assert check.returncode == 0, check.stdout[-2000:]


def test_a_ledger_change_that_fails_to_sign_is_retried_until_published(tmp_path):
    from p11fault.build import build_shim

    shim = build_shim(tmp_path / "shim")
    demo = build_demo(tmp_path / "demo", certs=3, precerts=1, revoke=0)
    softhsm = "/usr/lib/softhsm/libsofthsm2.so"
    demo.config.write_text(demo.config.read_text().replace(f'module = "{softhsm}"', f'module = "{shim}"')
                           .replace("workers = 2", "workers = 1")
                           + '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    # one worker: signature attempts are the probe (1) and the 4 catch-up responses; the 6th,
    # the new precertificate's, finds the token pulled out for 3 s (longer than the signer's own retries)
    env = {**demo.env(), "P11FAULT_MODULE": softhsm, "P11FAULT_TOKEN_GONE_FROM": "6", "P11FAULT_TOKEN_BACK_MS": "3000"}
    log = tmp_path / "refresh.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "ocspmint"), "refresh", "--config", str(demo.config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    svc = Service(demo, proc, log, 0)
    try:
        wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        serial = issue(demo, precert=True)
        wait_for(lambda: any(e["serial"] == f"{serial:040x}" for e in svc.events("failure")), "the signing failure", 30)
        wait_for(response_path(demo, serial).exists, "the retried precertificate response", 60)
        assert openssl_check(demo, response_path(demo, serial), serial).status == "good"
    finally:
        proc.terminate()
        proc.wait(30)
