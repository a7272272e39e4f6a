"""Faults during `ocspmint run`: HSM errors through a real fault-injecting
PKCS#11 module, SIGKILL at several points, bad ledger rows, wrong keys."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from e2e import BIN, ocspmint, response_path, run_json
from faultkit import SOFTHSM, use_module
from ocspmint.demo import Demo, build_demo
from ocspmint.ledger.sqlite import write_entries
from ocspmint.config import load_config
from ocspmint.issuer import load_issuers
from ocspmint.journal import Journal
from ocspmint.model import Kind, LedgerEntry, Reason, Status, serial_hex, utc_now
from ocspmint.pipeline import ledger_entries
from ocspmint.report import Summary
from ocspmint.runner import Runner, sign_all
from ocspmint.signer import Failed, SignerPool, key_spec, signer_pool
from ocspmint.store import FileStore


def store_objects(demo: Demo) -> list[Path]:
    return [p for p in (demo.root / "responses").rglob("*") if p.is_file() and ".tmp" not in p.parts]


def journal_count(demo: Demo) -> int:
    path = demo.root / "state" / "journal.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM published").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("rv", ["0x30", "0xb0", "0xb3"])  # DeviceError, SessionClosed, SessionHandleInvalid
def test_transient_pkcs11_errors_are_retried_on_fresh_sessions(tmp_path, shim, rv):
    demo = build_demo(tmp_path, certs=12, precerts=4, revoke=2)
    use_module(demo, shim)
    log = tmp_path / "faults.log"
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_AT": "3,7,8", "P11FAULT_SIGN_RV": rv, "P11FAULT_LOG": str(log)}
    code, summary = run_json(demo, env=env)
    assert code == 0 and summary["ok"], summary
    assert summary["published"] == 16 and summary["failures"] == []
    assert f"rv={rv}" in log.read_text()
    assert ocspmint(demo, "verify").returncode == 0


def test_permanent_device_error_fails_the_run_and_publishes_nothing_bad(tmp_path, shim):
    demo = build_demo(tmp_path, certs=8, precerts=4, revoke=2)
    text = demo.config.read_text().replace("workers = 2", "workers = 1\nbatch_size = 4")
    demo.config.write_text(text)
    use_module(demo, shim)
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_FROM": "6"}
    code, summary = run_json(demo, env=env)
    assert code == 1 and not summary["ok"]
    failed = {f["serial"] for f in summary["failures"]}
    assert all(f["stage"] == "sign" and "DeviceError" in f["message"] for f in summary["failures"])
    assert summary["published"] + len(failed) == 12
    assert summary["published"] == 4  # probe: signature 1; batch 1: 2-5; batch 2 fails at 6, 7, 8
    assert len(store_objects(demo)) == journal_count(demo) == summary["published"]
    assert ocspmint(demo, "verify").returncode == 0
    # the token recovers: the next run publishes exactly what is left
    code, again = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM})
    assert code == 0 and again["published"] == 8 and again["due"] == {"new": 8}


def test_login_failure_is_reported_per_serial(tmp_path, shim):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    use_module(demo, shim)
    code, summary = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_LOGIN_RV": "0xA0"})
    assert code == 1 and len(summary["failures"]) == 3
    assert "PinIncorrect" in summary["failures"][0]["message"]
    assert store_objects(demo) == []


def test_token_key_not_matching_signer_certificate_stops_before_publishing(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    demo.config.write_text(demo.config.read_text().replace("object=ocsp-responder", "object=issuing-ca"))
    code, summary = run_json(demo)
    assert code == 1 and "does not match the signer certificate" in summary["failures"][0]["message"]
    assert store_objects(demo) == []


def synthetic_ledger(demo: Demo, count: int) -> None:
    db = demo.root / "ledger.sqlite"
    now = utc_now()

    def entries():
        for i in range(count):
            serial = (0x5A << 120) + i * 7919
            if i % 20 == 0:
                yield LedgerEntry("issuing-ca", serial, Kind.CERTIFICATE, now + dt.timedelta(days=90), Status.REVOKED,
                                  now - dt.timedelta(hours=1), Reason.keyCompromise, "synthetic")
            else:
                kind = Kind.PRECERTIFICATE if i % 3 == 0 else Kind.CERTIFICATE
                yield LedgerEntry("issuing-ca", serial, kind, now + dt.timedelta(days=90), Status.GOOD, source="synthetic")

    write_entries(str(db), entries())
    text = demo.config.read_text()
    head, _, _ = text.partition("[[sources]]")
    demo.config.write_text(head + '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')


def kill_and_resume(demo: Demo, total: int, env: dict[str, str] | None = None) -> None:
    """SIGKILL ``ocspmint run`` at 4 journal counts, resume, and check that
    every response is journaled, stored and verified, and nothing is redone."""
    cmd = [str(BIN / "ocspmint"), "run", "--quiet", "--config", str(demo.config)]
    kills = 0
    # journal counts: the journal lags the store by up to Runner.JOURNAL_ROWS rows or
    # JOURNAL_SECONDS, so the last kill point leaves room for a few more journal writes
    for threshold in (1, total // 5, total * 2 // 5, total * 3 // 5):
        proc = subprocess.Popen(cmd, env={**demo.env(), **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while journal_count(demo) < threshold and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the run finished before it could be killed"
    assert journal_count(demo) < total
    code, summary = run_json(demo, env=env)
    assert code == 0 and summary["ok"], summary
    assert journal_count(demo) == total
    verify = ocspmint(demo, "verify", "--json", env=env)
    assert verify.returncode == 0, verify.stdout[-2000:]
    assert json.loads(verify.stdout)["checked"] == total  # every object in the store, none extra
    code, again = run_json(demo, env=env)
    assert code == 0 and again["published"] == 0 and again["up_to_date"] == total


def test_sigkill_at_several_points_then_resume_loses_nothing(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    synthetic_ledger(demo, 6000)
    demo.config.write_text(demo.config.read_text().replace("workers = 2", "workers = 2\nbatch_size = 64"))
    kill_and_resume(demo, 6000)
    assert len(store_objects(demo)) == 6000


def test_sigkill_during_s3_uploads_then_resume_loses_nothing(tmp_path, seaweed):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    synthetic_ledger(demo, 3000)
    demo.config.write_text(demo.config.read_text().replace("workers = 2", "workers = 2\nbatch_size = 64").replace(
        'url = "file:responses"', f'url = "s3://{seaweed.bucket}/kill"\nendpoint = "{seaweed.endpoint}"\nregion = "{seaweed.region}"'))
    kill_and_resume(demo, 3000, seaweed.env())


def corrupt_line(demo: Demo, index: int, mutate) -> int:
    lines = demo.index.read_text().splitlines(keepends=True)
    lines[index] = mutate(lines[index])
    demo.index.write_text("".join(lines))
    return index + 1


def test_bad_ledger_line_stops_the_run_naming_file_and_line(tmp_path):
    demo = build_demo(tmp_path, certs=4, precerts=2, revoke=1)
    lineno = corrupt_line(demo, 2, lambda l: l.replace("\t", "\t2X", 1))
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 1
    assert f"index.txt:{lineno}" in p.stdout and "Traceback" not in p.stderr
    assert store_objects(demo) == []


@pytest.mark.parametrize("mutate,words", [
    (lambda l: "Q" + l[1:], "status"),
    (lambda l: "\t".join(l.split("\t")[:3] + ["ZZ"] + l.split("\t")[4:]), "serial"),
])
def test_quarantine_reports_bad_lines_and_publishes_the_rest(tmp_path, mutate, words):
    demo = build_demo(tmp_path, certs=4, precerts=2, revoke=1)
    demo.config.write_text('on_error = "quarantine"\n' + demo.config.read_text())
    lineno = corrupt_line(demo, 1, mutate)
    code, summary = run_json(demo)
    assert code == 1
    [failure] = summary["failures"]
    assert failure["stage"] == "ledger" and failure["source"].endswith(f"index.txt:{lineno}")
    assert words in failure["message"]
    assert summary["published"] == 6 - 1


def test_missing_certificate_file_is_named(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    victim = demo.cert_path(demo.serials["good"][1])
    victim.unlink()
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 1 and victim.name in p.stdout and "missing" in p.stdout


def test_flipped_signature_bit_is_caught_by_verify(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    assert run_json(demo)[0] == 0
    serial = demo.serials["good"][0]
    der = bytearray(response_path(demo, serial).read_bytes())
    sig_at = der.rfind(bytes.fromhex("0348")) if b"\x03\x48" in der else der.rfind(b"\x03\x47")
    der[sig_at + 12] ^= 0x01
    bad = tmp_path / "flipped.der"
    bad.write_bytes(bytes(der))
    p = ocspmint(demo, "verify", str(bad))
    assert p.returncode == 1 and "signature" in p.stdout
    assert ocspmint(demo, "verify", str(response_path(demo, serial))).returncode == 0


def test_a_batch_back_without_verification_is_not_published(tmp_path, monkeypatch):
    """With verify on, only responses a signer process verified are stored:
    a pool whose workers were given nothing to verify with (a wiring bug)
    publishes nothing and names every serial at stage "verify"."""
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=1)
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    config = load_config(demo.config)
    issuers = load_issuers(config)
    summary = Summary(started=utc_now())
    planned = [(e, "new") for e in ledger_entries(config, issuers, summary) if e.not_after > utc_now()]
    assert config.signing.verify and planned
    with Journal(tmp_path / "state") as journal, SignerPool([key_spec(i) for i in issuers.values()], 1, 3) as pool:
        store = FileStore(tmp_path / "store")
        runner = Runner(config, issuers, journal, store, summary)
        sign_all(pool, runner, planned, None)
        store.close()
        assert journal.get(planned[0][0].issuer, planned[0][0].serial) is None
    assert summary.published == 0 and not list(store.keys())
    assert sorted((f.stage, f.serial) for f in summary.failures) == sorted(("verify", serial_hex(e.serial)) for e, _ in planned)
    assert {f.message for f in summary.failures} == {"the signer process returned the batch without verifying it"}


def test_a_batch_the_signer_cannot_verify_fails_at_once_naming_the_error(tmp_path, monkeypatch):
    """A batch whose verification raises in the signer process (here: a
    serial that is not hex, as a wiring bug would send) comes back Failed
    with the error, well before the pool's hang timeout; the next batch
    verifies and is published."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))
    config = load_config(demo.config)
    issuers = load_issuers(config)
    summary = Summary(started=utc_now())
    planned = [(e, "new") for e in ledger_entries(config, issuers, summary) if e.not_after > utc_now()]
    with Journal(tmp_path / "state") as journal, signer_pool(config, issuers) as pool:
        store = FileStore(tmp_path / "store")
        runner = Runner(config, issuers, journal, store, summary)
        bad = runner.make_batch(0, planned[0][0].issuer, planned[:1])
        assert bad is not None and bad.expect
        bad.expect[0] = msgspec.structs.replace(bad.expect[0], serial="not hex")
        pool.submit(bad)
        started = time.monotonic()
        replies = []
        while not replies and time.monotonic() - started < 30:
            replies = list(pool.collect(1))
        [reply] = replies
        assert isinstance(reply, Failed) and time.monotonic() - started < config.signing.timeout.total_seconds()
        runner.failed(reply)
        sign_all(pool, runner, planned[1:], None)
        store.close()
    [failure] = summary.failures
    assert failure.serial == serial_hex(planned[0][0].serial) and failure.message == (
        f"issuer {planned[0][0].issuer}: the signer process could not verify the batch: "
        "ValueError: invalid literal for int() with base 16: 'not hex'")
    assert summary.published == len(planned) - 1 == len(list(store.keys()))


def test_killed_signer_process_is_replaced_and_its_batch_resent(tmp_path, shim):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    synthetic_ledger(demo, 400)
    demo.config.write_text(demo.config.read_text().replace("workers = 2", "workers = 2\nbatch_size = 16"))
    use_module(demo, shim)
    env = {**demo.env(), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "20000"}
    cmd = [str(BIN / "ocspmint"), "run", "--quiet", "--json", "--config", str(demo.config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while journal_count(demo) < 32 and proc.poll() is None:
        time.sleep(0.01)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "no signer processes found"
    os.kill(int(children[-1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    summary = json.loads(out)
    assert proc.returncode == 0 and summary["ok"], (summary["failures"][:3], err[-2000:])
    assert summary["published"] == 400 and journal_count(demo) == 400
    assert summary["signer_restarts"] == 1
