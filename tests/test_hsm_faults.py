"""HSM faults during `ocspmint run`, injected by the p11fault shim in front of
a real SoftHSM2 token: a token pulled out (for good, or back within the
signer's backoff), a locked PIN, a key or token the URI names but the HSM
does not hold, a key whose policy forbids the mechanism, slow signing, an HSM that returns a corrupted signature
with CKR_OK, and sessions a network HSM drops while they sit idle during the
plan; and the shim's model of a pulled token itself.
CKR_DEVICE_ERROR, lost sessions, a wrong PIN and a killed signer process
are in test_faults.py and test_run.py.

Each failing case must end with exit status 1, a message naming the issuer,
the key's PKCS#11 URI and the CK_RV where the module returned one, no
traceback, no object or journal row for a serial that failed, and a journal
that matches the store."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import issuer_id, ocspmint, openssl_check, response_path, run_json
from faultkit import (SOFTHSM, assert_journal_matches_store, edit_config, failed_serials, file_objects, journal_rows,
                      set_signing, use_module, verify_clean)
from ocspmint.demo import SOFTHSM_MODULE, TOKEN_LABEL, Demo, build_demo, certify_responder
from ocspmint.ledger.sqlite import write_entries
from ocspmint.model import Kind, LedgerEntry, Status, utc_now
from ocspmint.store import object_key

URI = "pkcs11:token=ocspmint;object=ocsp-responder;type=private"


def faulty_demo(root: Path, shim: Path, **signing: int) -> Demo:
    """12 unexpired serials (8 certificates, 4 precertificates, 3 revoked),
    signed through the shim."""
    demo = build_demo(root, certs=8, precerts=4, revoke=2)
    use_module(demo, shim)
    if signing:
        set_signing(demo, **signing)
    return demo


def failing_run(demo: Demo, env: dict[str, str]) -> dict:
    """``ocspmint run --json`` that must fail cleanly: exit 1, no traceback; its summary."""
    p = ocspmint(demo, "run", "--quiet", "--json", env=env)
    assert "Traceback" not in p.stderr, p.stderr
    summary = json.loads(p.stdout)
    assert p.returncode == 1 and not summary["ok"]
    return summary


def unexpired(demo: Demo) -> set[int]:
    return set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"])


PULLED = """
import json, sys, time
import pkcs11
from pkcs11 import Mechanism, ObjectClass, SlotFlag
lib = pkcs11.lib(sys.argv[1])
pin = open(sys.argv[2]).read().strip()

def error(call):
    try:
        call()
        return "ok"
    except pkcs11.exceptions.PKCS11Error as e:
        return type(e).__name__

def look(out):
    out["present"] = len(lib.get_slots(token_present=True))
    out["flag"] = any(s.flags & SlotFlag.TOKEN_PRESENT for s in lib.get_slots())
    out["token"] = error(lambda: lib.get_token(token_label="ocspmint"))
    out["open"] = error(lambda: token.open())  # C_OpenSession on the slot found before the pull

token = lib.get_token(token_label="ocspmint")
session = token.open(user_pin=pin)
key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="ocsp-responder")
gone = {"sign": error(lambda: key.sign(bytes(32), mechanism=Mechanism.ECDSA))}
gone["again"] = error(lambda: key.sign(bytes(32), mechanism=Mechanism.ECDSA))
look(gone)
time.sleep(0.4)
back = {}
look(back)
fresh = lib.get_token(token_label="ocspmint").open(user_pin=pin)
back["sign"] = error(lambda: fresh.get_key(object_class=ObjectClass.PRIVATE_KEY, label="ocsp-responder")
                     .sign(bytes(32), mechanism=Mechanism.ECDSA))
back["old session"] = error(lambda: key.sign(bytes(32), mechanism=Mechanism.ECDSA))
print(json.dumps({"gone": gone, "back": back}))
"""


def test_shim_pulled_token_is_absent_for_every_call_until_it_is_back(tmp_path, shim):
    """The p11fault model of a pulled token (tests/p11fault/README.md, "Token
    removal"), seen through python-pkcs11 against SoftHSM2."""
    demo = build_demo(tmp_path, certs=0, precerts=0, revoke=0)
    env = {**demo.env(), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_TOKEN_GONE_FROM": "1", "P11FAULT_TOKEN_BACK_MS": "300"}
    p = subprocess.run([sys.executable, "-c", PULLED, str(shim), str(demo.pin_file)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)
    assert seen["gone"] == {"sign": "DeviceRemoved", "again": "SessionHandleInvalid", "present": 0, "flag": False,
                            "token": "NoSuchToken", "open": "TokenNotPresent"}
    assert seen["back"]["present"] >= 1 and seen["back"]["flag"] and seen["back"]["token"] == "ok"
    assert seen["back"]["sign"] == "ok" and seen["back"]["old session"] == "SessionHandleInvalid"


def test_token_pulled_mid_run_fails_the_rest_clearly_and_a_rerun_completes(tmp_path, shim):
    demo = faulty_demo(tmp_path, shim, workers=1, batch_size=4, retries=3)
    log = tmp_path / "faults.log"
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_TOKEN_GONE_FROM": "6", "P11FAULT_LOG": str(log)}
    summary = failing_run(demo, env)
    # signature 1: the key probe; 2-5: batch 1; 6: the token is pulled in batch 2
    assert summary["published"] == 4
    failed = failed_serials(summary, "sign")
    assert len(failed) == 8
    messages = {f["message"] for f in summary["failures"]}
    for message in messages:
        assert message.startswith(f"issuer issuing-ca: key {URI}: PKCS#11 signing failed 3 times"), message
        assert "NoSuchToken" in message  # reconnecting found no token
    assert any("first CKR_DEVICE_REMOVED (DeviceRemoved)" in m for m in messages), messages
    assert "sign#6 rv=0x32" in log.read_text() and "absent#" in log.read_text()
    # nothing of a failed serial reached the store or the journal
    rows = assert_journal_matches_store(demo, file_objects(demo).get)
    assert {s for _, s in rows}.isdisjoint(failed) and len(rows) == len(file_objects(demo)) == 4
    assert all(not response_path(demo, s).exists() for s in failed)
    assert verify_clean(demo) == 4
    # the token is back: the next run does exactly what is left
    code, again = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM})
    assert code == 0 and again["published"] == 8 and again["due"] == {"new": 8}
    assert verify_clean(demo) == 12


def test_token_back_within_the_backoff_loses_nothing(tmp_path, shim):
    """The signer waits 0.1 s, then 0.2 s before its reconnects
    (signer.backoff): a token back after 0.2 s is found by the third try."""
    demo = faulty_demo(tmp_path, shim, workers=1, batch_size=4, retries=3)
    log = tmp_path / "faults.log"
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_TOKEN_GONE_FROM": "4", "P11FAULT_TOKEN_BACK_MS": "200",
           "P11FAULT_LOG": str(log)}
    code, summary = run_json(demo, env=env)
    assert code == 0 and summary["ok"] and summary["failures"] == [], summary["failures"]
    assert summary["published"] == 12
    text = log.read_text()
    assert "sign#4 rv=0x32" in text and "absent#1 rv=0xe0" in text  # pulled, and a reconnect found it absent
    assert verify_clean(demo) == 12


@pytest.mark.parametrize("rv,ckr", [("0xA4", "CKR_PIN_LOCKED (PinLocked)"), ("0x32", "CKR_DEVICE_REMOVED (DeviceRemoved)")])
def test_login_refused_stops_before_signing_naming_the_ckr(tmp_path, shim, rv, ckr):
    demo = faulty_demo(tmp_path, shim)
    pin = demo.pin_file.read_text().strip()
    p = ocspmint(demo, "run", "--quiet", env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_LOGIN_RV": rv})
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and pin not in p.stdout + p.stderr
    failed = [line for line in p.stdout.splitlines() if line.startswith("  FAILED [sign] issuing-ca serial 0x")]
    assert len(failed) == 12, p.stdout
    assert all(f"login to token 'ocspmint' for {URI} failed: {ckr}" in line for line in failed), failed[0]
    assert p.stdout.rstrip().endswith("NOT OK: 12 failures, 0 purges pending")
    assert file_objects(demo) == {} and journal_rows(demo) == {}


@pytest.mark.parametrize("old,new,message", [
    ("object=ocsp-responder", "object=retired-responder",
     "key pkcs11:token=ocspmint;object=retired-responder;type=private not usable: NoSuchKey"),
    ("token=ocspmint", "token=standby-hsm",
     "token of pkcs11:token=standby-hsm;object=ocsp-responder;type=private not found: NoSuchToken"),
])
def test_key_or_token_missing_is_named_and_nothing_is_published(tmp_path, old, new, message):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    edit_config(demo, old, new)
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0
    assert len(summary["failures"]) == 4
    assert all(f["stage"] == "sign" and f["message"].startswith(f"issuer issuing-ca: {message}") for f in summary["failures"]), \
        summary["failures"][0]
    assert file_objects(demo) == {} and journal_rows(demo) == {}


def test_slow_signing_completes_and_every_response_verifies(tmp_path, shim):
    demo = faulty_demo(tmp_path, shim, workers=2, batch_size=3)
    code, summary = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "100000"})
    assert code == 0 and summary["ok"] and summary["published"] == summary["verified"] == 12, summary["failures"]
    assert verify_clean(demo) == 12
    for serial in sorted(unexpired(demo))[:3]:
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified, view.text
    assert set(journal_rows(demo)) == {("issuing-ca", s) for s in unexpired(demo)}
    assert set(file_objects(demo)) == {object_key(issuer_id(demo), s) for s in unexpired(demo)}


def test_hung_hsm_is_abandoned_after_the_signing_timeout_with_a_clear_error(tmp_path, shim):
    demo = faulty_demo(tmp_path, shim, workers=1, retries=2)
    edit_config(demo, "[signing]", '[signing]\ntimeout = "PT1S"')
    p = ocspmint(demo, "run", "--quiet", "--json", env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "30000000"},
                 timeout=120)
    summary = json.loads(p.stdout)
    assert p.returncode == 1 and summary["published"] == 0 and "Traceback" not in p.stderr
    assert failed_serials(summary, "sign") == unexpired(demo)
    assert all("signer process hung (no signature for 1 s)" in f["message"] for f in summary["failures"]), summary["failures"][0]
    assert file_objects(demo) == {} and journal_rows(demo) == {}


def test_corrupted_signature_is_never_published_and_a_rerun_publishes_it(tmp_path, shim):
    """An HSM that answers CKR_OK with a wrong signature (P11FAULT_SIGN_FLIP_AT:
    one bit flipped): verification, on by default, fails exactly those
    serials at stage "verify"; nothing of theirs reaches the store or the
    journal, every other serial is published and verifies, and a run with a
    sound HSM publishes the rest."""
    demo = faulty_demo(tmp_path, shim, workers=1, batch_size=4)
    log = tmp_path / "faults.log"
    # one worker signs everything: signature 1 is the key probe, 2-5 batch 1,
    # 6-9 batch 2, 10-13 batch 3; corrupt one response in batches 1 and 3
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FLIP_AT": "3,11", "P11FAULT_LOG": str(log)}
    summary = failing_run(demo, env)
    assert [line.split(" ", 1)[1] for line in log.read_text().splitlines()] == ["flip#3 rv=0x0", "flip#11 rv=0x0"]
    failed = failed_serials(summary, "verify")
    assert len(failed) == 2 and failed <= unexpired(demo), summary["failures"]
    assert len(summary["failures"]) == 2, summary["failures"]  # nothing else failed, at any stage
    for f in summary["failures"]:
        assert "signature: invalid" in f["message"], f
    assert summary["published"] == 10
    # nothing of a failed serial reached the store or the journal
    rows = assert_journal_matches_store(demo, file_objects(demo).get)
    assert {s for _, s in rows} == unexpired(demo) - failed
    assert all(not response_path(demo, s).exists() for s in failed)
    assert set(file_objects(demo)) == {object_key(issuer_id(demo), s) for s in unexpired(demo) - failed}
    assert verify_clean(demo) == 10
    before = file_objects(demo)
    # a sound HSM: the next run signs exactly the two that are missing
    code, again = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM})
    assert code == 0 and again["ok"] and again["failures"] == [], again["failures"]
    assert again["published"] == 2 and again["due"] == {"new": 2}
    assert set(journal_rows(demo)) == {("issuing-ca", s) for s in unexpired(demo)}
    after = file_objects(demo)
    assert {k: v for k, v in after.items() if k in before} == before  # the 10 already published are untouched
    assert verify_clean(demo) == 12
    for serial in sorted(failed):
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified, view.text


def add_synthetic_ledger(demo: Demo, live: int, expired: int) -> set[int]:
    """A second ledger source (SQLite) for the demo's issuer: ``live``
    unexpired certificates and ``expired`` expired ones. Returns the live
    serials. Expired rows are read and counted by the plan but never
    signed, so they make the plan long at little cost to the run."""
    now = utc_now()

    def entries():
        for i in range(live + expired):
            not_after = now + dt.timedelta(days=90) if i < live else now - dt.timedelta(days=1)
            yield LedgerEntry("issuing-ca", (0x5A << 120) + i * 7919, Kind.CERTIFICATE, not_after, Status.GOOD,
                              source="synthetic")

    write_entries(str(demo.root / "ledger.sqlite"), entries())
    demo.config.write_text(demo.config.read_text() + '\n[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')
    return {(0x5A << 120) + i * 7919 for i in range(live)}


@pytest.mark.parametrize("backend", ["native", "python"])
def test_sessions_dropped_while_idle_during_the_plan_are_reopened_and_nothing_is_lost(tmp_path, shim, backend):
    """A network HSM drops a session that saw no call for too long. The
    signer worker signs what the ledger pass finds due as it goes, then sits
    idle while the pass reads on through rows with nothing due; the batch
    the end of the pass completes meets a dropped session
    (P11FAULT_SESSION_IDLE_MS): the worker backs off, reopens its sessions,
    signs on, and the run publishes every unexpired serial."""
    demo = faulty_demo(tmp_path, shim, workers=1, batch_size=64)
    edit_config(demo, "workers = 1", f'workers = 1\nbackend = "{backend}"')
    # The plan. The demo's 12 unexpired serials (index.txt) and the first 488
    # live rows of the SQLite source fill one journal lookup of 500 serials:
    # the key probe and 7 batches of 64 are signed while the pass reads on,
    # and 52 entries wait for a full batch. The last 12 live rows are judged
    # only at the end of the pass, after 150,000 expired rows (~0.6 s): then
    # the 8th batch goes out, after the sessions sat idle ~0.5 s, 5x the 100
    # ms limit. The limit is in turn far above the gaps between calls while
    # signing runs (microseconds within a batch, about a millisecond between
    # batches, a few ms from a reopen to its first signature), so a reopened
    # session signs at once and a batch can never fail `retries` times in a
    # row. A stall of the parent (a slow fsync) can drop a session between
    # two other batches too, and the close at the end of the run can meet an
    # idle session: both are fine, so the log is only checked for a drop with
    # signatures before and after it. P11FAULT_SIGN_DELAY_US=1 is there only
    # to log each signature attempt (delay#n).
    live = add_synthetic_ledger(demo, live=500, expired=150_000)
    log = tmp_path / "faults.log"
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SESSION_IDLE_MS": "100", "P11FAULT_SIGN_DELAY_US": "1",
           "P11FAULT_LOG": str(log)}
    p = ocspmint(demo, "run", "--quiet", "--json", env=env)
    assert "Traceback" not in p.stderr, p.stderr
    summary = json.loads(p.stdout)
    assert p.returncode == 0 and summary["ok"] and summary["failures"] == [], summary["failures"][:3]
    assert summary["signer_backend"] == {"issuing-ca": backend}
    everything = unexpired(demo) | live
    assert summary["published"] == len(everything) == 512 and summary["due"] == {"new": 512}
    # every unexpired serial is journaled, and its object is in the store as journaled
    rows = assert_journal_matches_store(demo, file_objects(demo).get)
    assert {s for _, s in rows} == everything
    assert set(file_objects(demo)) == {object_key(issuer_id(demo), s) for s in everything}
    # signing met a session dropped while idle (longer than the limit) after
    # the first batches, and the rest was signed on reopened sessions
    lines = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    drops = [n for n, line in enumerate(lines) if (m := re.fullmatch(r"idle#(\d+) rv=0xb3", line)) and int(m[1]) > 100]
    assert drops, lines
    assert lines[0] == "delay#1 rv=0x0", lines  # the probe, on a fresh session
    assert any(lines[n + 1].startswith("delay#") for n in drops if n + 1 < len(lines)), lines  # signing went on
    assert sum(line.startswith("delay#") for line in lines) == 1 + 512
    assert verify_clean(demo) == 512


@pytest.mark.parametrize("backend", ["native", "python"])
def test_a_key_whose_policy_forbids_the_mechanism_stops_the_run_naming_the_ck_rv(tmp_path, backend):
    """An HSM key policy (CKA_ALLOWED_MECHANISMS) that allows only
    CKM_ECDSA_SHA384, while ocspmint signs P-256 with CKM_ECDSA over its own
    SHA-256: the key probe fails with the token's CKR_MECHANISM_INVALID and
    nothing is published."""
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    request = {"module": SOFTHSM_MODULE, "token": TOKEN_LABEL, "pin_file": str(demo.pin_file), "label": "policy",
               "allowed": ["ECDSA_SHA384"]}
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "p11policy.py")], input=json.dumps(request),
                       env=demo.env(), capture_output=True, text=True, check=True)
    cert = certify_responder(demo, "policy", bytes.fromhex(p.stdout))
    edit_config(demo, "object=ocsp-responder", "object=policy")
    edit_config(demo, 'cert = "ca/responder.pem"', f'cert = "{cert}"')
    edit_config(demo, "workers = 2", f'workers = 1\nbackend = "{backend}"\nretries = 2')
    summary = failing_run(demo, {})
    assert summary["published"] == 0 and file_objects(demo) == {} and journal_rows(demo) == {}
    messages = {f["message"] for f in summary["failures"]}
    assert messages == {"issuer issuing-ca: probe signature failed: key pkcs11:token=ocspmint;object=policy;type=private: "
                        "PKCS#11 signing failed 2 times in a row on fresh sessions: CKR_MECHANISM_INVALID (MechanismInvalid)"}

