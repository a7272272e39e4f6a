"""The native signing path (ocspmint._p11native, native/README.md) and the
software-key signer (key_file).

Native and python-pkcs11 backends must give the same response bytes (RSA
PKCS#1 v1.5 is deterministic; ECDSA differs only in k, so there the
ResponseData must match and both must verify); many sessions signing at
once must not mix up or corrupt signatures; per-item CK_RV failures
(tests/p11fault) are retried on fresh sessions; init/login/key errors
name the CKR code and the URI, never the PIN. PKCS#11 runs only in child
processes (each fault scenario in its own), never in pytest's."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
from cryptography.x509 import ocsp

from e2e import ocspmint, openssl_check, response_path, run_json
from faultkit import SOFTHSM, edit_config, failed_serials, file_objects, journal_rows, use_module, verify_clean
from ocspmint.demo import Demo, build_demo
from ocspmint.encoder import ecdsa_signature
from p11fault.build import build_shim

native = pytest.importorskip("ocspmint._p11native", reason="the C extension is not built (pip install -e .)")

URI = "pkcs11:token=ocspmint;object=ocsp-responder;type=private"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Demo]:
    """One small demo per responder key type, built on first use."""
    made: dict[str, Demo] = {}

    class Lazy(dict):
        def __missing__(self, key: str) -> Demo:
            made[key] = build_demo(tmp_path_factory.mktemp(key), certs=2, precerts=1, revoke=1, responder_key=key)
            return made[key]

    return Lazy()


def child(demo: Demo, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter with the demo's SoftHSM2; it
    fills the dict ``out``, printed as JSON."""
    script = "import json, sys\nout = {}\n" + code + "\nprint(json.dumps(out))\n"
    p = subprocess.run([sys.executable, "-c", script, *args], env={**demo.env(), **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# Sign `count` synthetic ResponseData through the worker's key holder
# (signer._Keys + _sign_with_retry, as a worker does) with one backend.
SIGN_RESPONSES = """
import datetime as dt
from ocspmint.config import load_config
from ocspmint.encoder import ResponseTemplate, Times
from ocspmint.issuer import load_issuers
from ocspmint.model import Kind, LedgerEntry, Status
from ocspmint.signer import SignBatch, Signed, _Keys, _sign_with_retry, key_spec
config, backend, sessions, count, now = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
now = dt.datetime.fromisoformat(now)
ident = load_issuers(load_config(config))["issuing-ca"]
template = ResponseTemplate(ident, ("sha1",))
fields = template.time_fields(Times(now, now - dt.timedelta(hours=1), now + dt.timedelta(days=6)))
tbs = [template.tbs(LedgerEntry("issuing-ca", 0x1000 + i, Kind.CERTIFICATE, now + dt.timedelta(days=90), Status.GOOD),
                    fields) for i in range(count)]
keys = _Keys([key_spec(ident)], backend, sessions)
keys.open()
out["backends"] = keys.backends()
out["mechanism"] = int(keys.keys["issuing-ca"].mechanism)
reply = _sign_with_retry(keys, SignBatch(1, "issuing-ca", tbs), 3)
keys.close()
assert isinstance(reply, Signed), reply
out["responses"] = [template.response(t, s).hex() for t, s in zip(tbs, reply.signatures)]
"""


def sign_run(demo: Demo, backend: str, count: int, now: dt.datetime, sessions: int = 1, config: Path | None = None,
             env: dict[str, str] | None = None) -> tuple[int, list[bytes]]:
    """(the key holder's mechanism, the DER responses)."""
    out = child(demo, SIGN_RESPONSES, str(config or demo.config), backend, str(sessions), str(count),
                now.isoformat(), env=env)
    assert out["backends"] == {"issuing-ca": backend}
    return out["mechanism"], [bytes.fromhex(r) for r in out["responses"]]


def sign_responses(demo: Demo, backend: str, count: int, now: dt.datetime, sessions: int = 1) -> list[bytes]:
    return sign_run(demo, backend, count, now, sessions)[1]


def responder_key(demo: Demo):
    return x509.load_pem_x509_certificate(demo.responder_cert.read_bytes()).public_key()


def assert_response_verifies(demo: Demo, der: bytes) -> ocsp.OCSPResponse:
    resp = ocsp.load_der_ocsp_response(der)
    key = responder_key(demo)
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), hashes.SHA256())
    else:
        key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    return resp


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


# --------------------------------------------------------------------------
# native vs python-pkcs11


def test_rsa_native_and_python_give_identical_response_bytes(demos):
    demo, now = demos["rsa-2048"], now_utc()
    native_der = sign_responses(demo, "native", 24, now, sessions=3)
    python_der = sign_responses(demo, "python", 24, now)
    assert native_der == python_der
    for der in native_der:
        assert_response_verifies(demo, der)


@pytest.mark.parametrize("key", ["ec-p256", "ec-p384"])
def test_ecdsa_native_and_python_responses_match_but_for_k_and_both_verify(demos, key):
    demo, now = demos[key], now_utc()
    native_der = sign_responses(demo, "native", 16, now, sessions=2)
    python_der = sign_responses(demo, "python", 16, now)
    assert len(native_der) == len(python_der) == 16
    for a, b in zip(native_der, python_der):
        ra, rb = assert_response_verifies(demo, a), assert_response_verifies(demo, b)
        assert ra.tbs_response_bytes == rb.tbs_response_bytes
        assert ra.signature_algorithm_oid == rb.signature_algorithm_oid
        assert ra.signature_hash_algorithm.name == ("sha384" if key == "ec-p384" else "sha256")


@pytest.mark.parametrize("key", ["ec-p256", "ec-p384"])
def test_ecdsa_hashes_in_the_token_when_it_offers_the_mechanism_else_in_the_worker(demos, shim, key):
    """A token without CKM_ECDSA_SHA256/384 (the shim refusing them, as
    SoftHSM2 2.6 does): the worker hashes and signs the digest (CKM_ECDSA).
    The shim's P11FAULT_ECDSA_HASH=1 offers them: the worker passes the
    ResponseData itself. Same ResponseData either way,
    every response verifies, and both paths get DER from the extension."""
    demo, now = demos[key], now_utc()
    hashed = native.CKM_ECDSA_SHA384 if key == "ec-p384" else native.CKM_ECDSA_SHA256
    config = demo.config.with_name("ocspmint-shim.toml")
    config.write_text(demo.config.read_text().replace(f'module = "{SOFTHSM}"', f'module = "{shim}"'))
    here_mech, here = sign_run(demo, "native", 12, now, sessions=2, config=config,
                               env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_ECDSA_HASH": "0"})
    token_mech, token = sign_run(demo, "native", 12, now, sessions=2, config=config,
                                 env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_ECDSA_HASH": "1"})
    assert (here_mech, token_mech) == (native.CKM_ECDSA, hashed)
    for a, b in zip(here, token, strict=True):
        ra, rb = assert_response_verifies(demo, a), assert_response_verifies(demo, b)
        assert ra.tbs_response_bytes == rb.tbs_response_bytes


# --------------------------------------------------------------------------
# the extension itself: threads, sessions, per-item errors

NATIVE = """
import hashlib, os
from ocspmint import _p11native as native
from ocspmint.demo import RESPONDER_LABEL, TOKEN_LABEL
module = native.Module(os.environ.get("TEST_P11_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
pin = open(sys.argv[1]).read().strip().encode()
def digest(i):
    return hashlib.sha256(b"item %d" % i).digest()
"""


def test_many_sessions_sign_concurrently_without_mixing_up_items(demos):
    demo = demos["ec-p256"]
    out = child(demo, NATIVE + """
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=4)
out["sessions"], out["token"] = signer.sessions, signer.token
results = signer.sign_batch([digest(i) for i in range(2000)], native.CKM_ECDSA)
results += signer.sign_batch([digest(i) for i in range(2000, 2100)], native.CKM_ECDSA)
out["live"] = signer.live_sessions
out["empty"] = signer.sign_batch([], native.CKM_ECDSA)
out["results"] = [r.hex() if isinstance(r, bytes) else r for r in results]
signer.close()
module.close()
out["closed"] = [signer.closed, module.closed]
""", str(demo.pin_file))
    assert out["sessions"] == 4 and out["live"] == 4 and out["token"] == "ocspmint"
    assert out["empty"] == [] and out["closed"] == [True, True]
    results = out["results"]
    assert len(results) == 2100 and all(isinstance(r, str) for r in results)
    key = responder_key(demo)
    for i, r in enumerate(results):
        raw = bytes.fromhex(r)
        assert len(raw) == 64
        sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.verify(sig, hashlib.sha256(b"item %d" % i).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_batches_submitted_back_to_back_each_get_their_own_signatures(demos, shim):
    """``submit`` queues batches behind one another (the sessions take the
    next batch's items as they finish the last's, behind a 20 ms HSM):
    waited for in any order, each job gives the signatures of its own
    items; an empty batch is done at once. ``close`` is refused while a
    job is queued; a job dropped without ``wait`` is waited for, so the
    signer closes cleanly after, and jobs outlive their closed signer."""
    demo = demos["ec-p256"]
    env = {"TEST_P11_MODULE": str(shim), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "20000"}
    out = child(demo, NATIVE + """
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=3)
sizes = [5, 1, 7, 0, 4]
starts = [sum(sizes[:n]) for n in range(len(sizes))]
jobs = [signer.submit([digest(s + i) for i in range(size)], native.CKM_ECDSA) for s, size in zip(starts, sizes)]
try:
    signer.close()
except RuntimeError as e:
    out["close_while_queued"] = str(e)
out["results"] = []
for n in reversed(range(len(jobs))):
    got = jobs[n].wait()
    out["results"].append([starts[n], [r.hex() if isinstance(r, bytes) else r for r in got]])
    out.setdefault("again_same", []).append(jobs[n].wait() is got)
out["done"] = [j.done for j in jobs]
dropped = signer.submit([digest(i) for i in range(6)], native.CKM_ECDSA)
del dropped
signer.close()
out["done_after_close"] = jobs[0].done
del jobs, got  # freed after the signer closed (its mutex gone): nothing to wait for
module.close()
out["closed"] = signer.closed
""", str(demo.pin_file), env=env)
    assert "while 4 submitted batch(es) are being signed" in out["close_while_queued"], out["close_while_queued"]
    assert out["done"] == [True] * 5 and out["again_same"] == [True] * 5 and out["closed"] and out["done_after_close"]
    key = responder_key(demo)
    assert [(start, len(results)) for start, results in out["results"]] == [(13, 4), (13, 0), (6, 7), (5, 1), (0, 5)]
    for start, results in out["results"]:
        for i, r in enumerate(results):
            raw = bytes.fromhex(r)
            sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            key.verify(sig, hashlib.sha256(b"item %d" % (start + i)).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_session_failing_in_one_queued_batch_signs_the_next(demos, shim):
    """One session, two batches queued: its failure (GENERAL_ERROR at the
    3rd signature) ends its share of the first batch (the rest None, for
    the caller to retry), not of the batch behind it."""
    demo = demos["ec-p256"]
    env = {"TEST_P11_MODULE": str(shim), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_AT": "3",
           "P11FAULT_SIGN_RV": "0x5"}
    out = child(demo, NATIVE + """
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=1)
first = signer.submit([digest(i) for i in range(5)], native.CKM_ECDSA)
second = signer.submit([digest(i) for i in range(3)], native.CKM_ECDSA)
out["first"] = [type(r).__name__ if not isinstance(r, int) else r for r in first.wait()]
out["second"] = [type(r).__name__ if not isinstance(r, int) else r for r in second.wait()]
signer.close(); module.close()
""", str(demo.pin_file), env=env)
    assert out["first"] == ["bytes", "bytes", 0x5, "NoneType", "NoneType"]
    assert out["second"] == ["bytes"] * 3


DER_SIGNATURES = """
count, hash_name, mechanism = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=2)
out["supports"] = [signer.supports(m) for m in (native.CKM_ECDSA, native.CKM_ECDSA_SHA256, native.CKM_ECDSA_SHA384)]
data = [b"response %d" % i for i in range(count)]
if mechanism == native.CKM_ECDSA:
    data = [hashlib.new(hash_name, d).digest() for d in data]
out["der"] = [r.hex() if isinstance(r, bytes) else r for r in signer.sign_batch(data, mechanism, der=True)]
try:
    signer.sign_batch(data[:1], native.CKM_SHA256_RSA_PKCS, der=True)
except ValueError as e:
    out["rsa_der"] = str(e)
signer.close()
module.close()
"""


@pytest.mark.parametrize("key", ["ec-p256", "ec-p384"])
def test_der_ecdsa_signatures_from_the_extension_verify_and_are_minimal(demos, shim, key):
    """sign_batch(..., der=True) over many signatures, so that r or s has
    its high bit set (a 00 goes first) and, about once in 128 signatures,
    a leading zero octet (dropped): each DER ECDSA-Sig-Value verifies, and
    is byte for byte what ecdsa_signature makes of the same r||s. Both the
    digest path (CKM_ECDSA, the shim refusing hash-and-sign) and
    hash-in-token (the shim's CKM_ECDSA_SHA256/384)."""
    demo, count = demos[key], 2000
    hash_name, half = ("sha384", 48) if key == "ec-p384" else ("sha256", 32)
    hashed = native.CKM_ECDSA_SHA384 if key == "ec-p384" else native.CKM_ECDSA_SHA256
    algorithm = ec.ECDSA(hashes.SHA384() if key == "ec-p384" else hashes.SHA256())
    public = responder_key(demo)
    seen: Counter[str] = Counter()
    for mechanism, offered in ((native.CKM_ECDSA, "0"), (hashed, "1")):
        env = {"TEST_P11_MODULE": str(shim), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_ECDSA_HASH": offered}
        out = child(demo, NATIVE + DER_SIGNATURES, str(demo.pin_file), str(count), hash_name, str(mechanism),
                    env=env)
        # [CKM_ECDSA, CKM_ECDSA_SHA256, CKM_ECDSA_SHA384] as the shim offers them
        assert out["supports"] == ([True, True, True] if offered == "1" else [True, False, False])
        assert "der=True needs an ECDSA mechanism" in out["rsa_der"]
        assert len(out["der"]) == count and all(isinstance(d, str) for d in out["der"])
        for i, d in enumerate(out["der"]):
            sig = bytes.fromhex(d)
            public.verify(sig, b"response %d" % i, algorithm)
            r, s = decode_dss_signature(sig)
            assert sig == ecdsa_signature(r.to_bytes(half, "big") + s.to_bytes(half, "big"))
            for v in (r, s):
                seen["high bit"] += v.bit_length() == 8 * half
                seen["leading zero"] += v.bit_length() <= 8 * (half - 1)
    assert seen["high bit"] > 0 and seen["leading zero"] > 0, seen


def test_sessions_hide_a_slow_hsm_s_latency(demos, shim):
    """A network HSM answers slowly (100 ms per signature through the shim):
    8 sessions, one thread each (visible in /proc), sign 16 items and stop
    their threads on close. How much the overlap gains is measured by
    bench/nethsm_throughput.py, not asserted here (tests never time)."""
    demo = demos["ec-p256"]
    env = {"TEST_P11_MODULE": str(shim), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "100000"}
    out = child(demo, NATIVE + """
before = len(os.listdir("/proc/self/task"))
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=8)
out["threads"] = len(os.listdir("/proc/self/task")) - before
results = signer.sign_batch([digest(i) for i in range(16)], native.CKM_ECDSA)
out["signed"] = sum(isinstance(r, bytes) for r in results)
signer.close()
out["after_close"] = len(os.listdir("/proc/self/task")) - before
module.close()
""", str(demo.pin_file), env=env)
    assert out["threads"] == 8 and out["after_close"] == 0 and out["signed"] == 16


def test_two_signers_on_one_token_share_the_login_and_sign_from_two_python_threads(demos):
    """Two keys (the responder's and the imported CA key) on one token:
    the second C_Login answers USER_ALREADY_LOGGED_IN, which is fine; two
    Python threads sign at once with the GIL released."""
    demo = demos["ec-p256"]
    out = child(demo, NATIVE + """
import threading
a = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=2)
b = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_id=b"\\x02", sessions=2)
res = {}
def run(name, signer):
    res[name] = signer.sign_batch([digest(i) for i in range(300)], native.CKM_ECDSA)
threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
[t.start() for t in threads]
[t.join() for t in threads]
out["ok"] = {n: sum(isinstance(r, bytes) and len(r) == 64 for r in v) for n, v in res.items()}
try:
    module.close()
except RuntimeError as e:
    out["close_with_signers"] = str(e)
a.close(); b.close(); module.close()
""", str(demo.pin_file))
    assert out["ok"] == {"a": 300, "b": 300}
    assert "still open" in out["close_with_signers"]


def test_a_forked_child_is_refused_the_inherited_signer_and_leaves_the_parent_s_sessions_alone(demos):
    """fork() copies a Signer but not its threads, and its sessions are the
    parent's: in the child, signing or opening a Signer on the inherited
    Module raises RuntimeError naming both processes, and the child's close
    and exit neither hang (no thread to join) nor end the parent's sessions
    (no C_CloseSession, no C_Finalize). Before the guard, a child that
    merely exited hung for ever."""
    demo = demos["ec-p256"]
    out = child(demo, NATIVE + """
import time
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=2)
signer.sign_batch([digest(i) for i in range(4)], native.CKM_ECDSA)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    seen = {"pid": os.getpid()}
    for name, call in (("sign", lambda: signer.sign_batch([digest(0)], native.CKM_ECDSA)),
                       ("new_signer", lambda: native.Signer(module, token_label=TOKEN_LABEL, pin=pin,
                                                            key_label=RESPONDER_LABEL))):
        try:
            call()
            seen[name] = "no error"
        except RuntimeError as e:
            seen[name] = str(e)
    seen["live"] = signer.live_sessions
    signer.close()
    module.close()
    os.write(w, json.dumps(seen).encode())
    sys.exit(0)  # interpreter exit: the inherited objects are freed
os.close(w)
deadline = time.monotonic() + 20
while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
if done[0] == 0:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
out["child_exited"] = done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
out["child"] = json.loads(os.read(r, 65536) or b"{}")
out["parent_pid"] = os.getpid()
after = signer.sign_batch([digest(i) for i in range(8)], native.CKM_ECDSA)
out["parent_signed"] = sum(isinstance(s, bytes) and len(s) == 64 for s in after)
out["parent_live"] = signer.live_sessions
signer.close(); module.close()
""", str(demo.pin_file))
    kid = out["child"]
    assert out["child_exited"], "the forked child hung or failed on exit"
    for name, what in (("sign", "Signer"), ("new_signer", "Module")):
        assert kid[name].startswith(f"this {what} was opened in process {out['parent_pid']} "), kid[name]
        assert f"by process {kid['pid']}" in kid[name]
    assert kid["live"] == 0
    assert out["parent_signed"] == 8 and out["parent_live"] == 2

@pytest.mark.parametrize("rv,fatal", [("0x30", True), ("0x5", False)])
def test_a_failed_item_comes_back_as_its_ckr_and_the_rest_untried(demos, shim, rv, fatal):
    """sessions=1, FAIL_AT=3: items 1-2 signed, item 3 is the int CK_RV,
    4-6 None. A session-fatal rv (DEVICE_ERROR) leaves no live session; a
    GENERAL_ERROR leaves the session usable for the next batch."""
    demo = demos["ec-p256"]
    env = {"TEST_P11_MODULE": str(shim), "P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_AT": "3",
           "P11FAULT_SIGN_RV": rv}
    out = child(demo, NATIVE + """
signer = native.Signer(module, token_label=TOKEN_LABEL, pin=pin, key_label=RESPONDER_LABEL, sessions=1)
first = signer.sign_batch([digest(i) for i in range(6)], native.CKM_ECDSA)
out["first"] = [type(r).__name__ if not isinstance(r, int) else r for r in first]
out["live"] = signer.live_sessions
again = signer.sign_batch([digest(i) for i in range(3)], native.CKM_ECDSA)
out["again"] = [type(r).__name__ if not isinstance(r, int) else r for r in again]
out["name"] = native.ckr_name(first[2])
signer.close(); module.close()
""", str(demo.pin_file), env=env)
    code = int(rv, 16)
    assert out["first"] == ["bytes", "bytes", code, "NoneType", "NoneType", "NoneType"]
    assert out["name"] == ("CKR_DEVICE_ERROR" if fatal else "CKR_GENERAL_ERROR")
    if fatal:
        assert out["live"] == 0 and out["again"] == ["NoneType"] * 3
    else:
        assert out["live"] == 1 and out["again"] == ["bytes"] * 3


def test_init_errors_name_the_ckr_and_never_the_pin(demos, tmp_path):
    demo = demos["ec-p256"]
    out = child(demo, NATIVE + """
def attempt(token_label=TOKEN_LABEL, **kw):
    try:
        native.Signer(module, token_label=token_label, **kw).close()
        return None
    except native.Error as e:
        return {"msg": str(e), "rv": e.rv, "stage": e.stage, "token": e.token}
out["pin"] = attempt(pin=b"0000-wrong-pin", key_label=RESPONDER_LABEL)
out["key"] = attempt(pin=pin, key_label="no-such-key")
out["token"] = attempt("no-such-token", pin=pin, key_label=RESPONDER_LABEL)
try:
    native.Module("/nonexistent/libpkcs11.so")
except native.Error as e:
    out["module"] = {"msg": str(e), "stage": e.stage}
module.close()
""", str(demo.pin_file))
    pin = demo.pin_file.read_text().strip()
    assert out["pin"]["rv"] == 0xA0 and out["pin"]["stage"] == "login" and out["pin"]["token"] == "ocspmint"
    assert "C_Login: CKR_PIN_INCORRECT" in out["pin"]["msg"] and "0000-wrong-pin" not in json.dumps(out)
    assert pin not in json.dumps(out)
    assert out["key"]["stage"] == "key" and out["key"]["rv"] is None and out["key"]["msg"].startswith("NoSuchKey")
    assert out["token"]["stage"] == "token" and out["token"]["msg"].startswith("NoSuchToken")
    assert out["module"]["stage"] == "load" and "/nonexistent/libpkcs11.so" in out["module"]["msg"]


# --------------------------------------------------------------------------
# `ocspmint run` with the native backend


def set_signing(demo: Demo, **keys: object) -> None:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    edit_config(demo, "[signing]\nworkers = 2", "[signing]\n" + lines)


def unexpired(demo: Demo) -> set[int]:
    return set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"])


@pytest.mark.parametrize("rv", ["0x30", "0xb3", "0x5"])  # DeviceError, SessionHandleInvalid, GeneralError
def test_per_item_ckr_errors_are_retried_on_fresh_sessions(tmp_path, shim, rv):
    demo = build_demo(tmp_path, certs=10, precerts=4, revoke=2)
    use_module(demo, shim)
    set_signing(demo, workers=1, batch_size=8, backend="native", sessions=3)
    log = tmp_path / "faults.log"
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_AT": "3,7,8,12", "P11FAULT_SIGN_RV": rv,
           "P11FAULT_LOG": str(log)}
    code, summary = run_json(demo, env=env)
    assert code == 0 and summary["ok"] and summary["failures"] == [], summary["failures"]
    assert summary["published"] == summary["verified"] == 14
    assert summary["signer_backend"] == {"issuing-ca": "native"}
    assert len([line for line in log.read_text().splitlines() if f"rv={rv}" in line]) == 4
    assert verify_clean(demo) == 14
    serial = sorted(unexpired(demo))[0]
    assert openssl_check(demo, response_path(demo, serial), serial).verified


def test_permanent_fault_fails_the_batch_naming_issuer_uri_and_ckr(tmp_path, shim):
    demo = build_demo(tmp_path, certs=8, precerts=4, revoke=2)
    use_module(demo, shim)
    set_signing(demo, workers=1, batch_size=4, backend="native", sessions=2)
    # from the 10th C_Sign on (the key probe is the 1st): the first batch (calls 2-5 when signed alone) is published
    # whatever the order in which the two sessions reach the token; with the next batch queued behind it
    # (signer.PIPELINE), its last item may be the 6th or 7th call
    code, summary = run_json(demo, env={"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_FAIL_FROM": "10"})
    assert code == 1 and not summary["ok"]
    failed = failed_serials(summary, "sign")
    assert failed and summary["published"] + len(failed) == 12
    for f in summary["failures"]:
        assert f["message"].startswith(f"issuer issuing-ca: key {URI}: PKCS#11 signing failed 3 times in a row"), f
        assert "CKR_DEVICE_ERROR (DeviceError)" in f["message"]
    assert len(file_objects(demo)) == len(journal_rows(demo)) == summary["published"]
    assert verify_clean(demo) == summary["published"]


def test_wrong_pin_with_the_native_backend_names_ckr_and_uri_not_the_pin(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    set_signing(demo, workers=1, backend="native", sessions=2)
    pin = demo.pin_file.read_text().strip()
    bad = tmp_path / "bad-pin"
    bad.write_text("0000-not-the-pin\n")
    edit_config(demo, 'pin_file = "pin.txt"', f'pin_file = "{bad}"')
    p = ocspmint(demo, "run", "--quiet", "--json")
    summary = json.loads(p.stdout)
    assert p.returncode == 1 and summary["published"] == 0 and "Traceback" not in p.stderr
    assert len(summary["failures"]) == 3
    for f in summary["failures"]:
        assert f["message"] == (f"issuer issuing-ca: login to token 'ocspmint' for {URI} failed: "
                                "CKR_PIN_INCORRECT (PinIncorrect)"), f
    assert pin not in p.stdout + p.stderr and "0000-not-the-pin" not in p.stdout + p.stderr


def test_missing_key_with_the_native_backend_is_named(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    set_signing(demo, workers=1, backend="native")
    edit_config(demo, "object=ocsp-responder", "object=retired-responder")
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0
    want = ("issuer issuing-ca: key pkcs11:token=ocspmint;object=retired-responder;type=private not usable: NoSuchKey "
            "(no single private key on the token matches the URI)")
    assert [f["message"] for f in summary["failures"]] == [want] * 3


BLOCK_NATIVE = """
import sys

class _NoNative:
    def find_spec(self, name, path=None, target=None):
        if name == "ocspmint._p11native":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, _NoNative())
"""


def test_backend_choice_auto_python_and_native_without_the_extension(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    code, summary = run_json(demo)
    assert code == 0 and summary["signer_backend"] == {"issuing-ca": "native"}  # auto, extension built
    set_signing(demo, workers=1, backend="python")
    (demo.root / "state" / "journal.sqlite").unlink()
    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == 3 and summary["signer_backend"] == {"issuing-ca": "python"}
    (demo.root / "state" / "journal.sqlite").unlink()
    assert "signing backend: issuing-ca python" in ocspmint(demo, "run", "--quiet").stdout
    # no extension (a sitecustomize blocks its import in every process): auto falls back, native says why
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_NATIVE)
    env = {"PYTHONPATH": os.pathsep.join([str(site), SRC])}
    edit_config(demo, 'backend = "python"', 'backend = "auto"')
    (demo.root / "state" / "journal.sqlite").unlink()
    code, summary = run_json(demo, env=env)
    assert code == 0 and summary["signer_backend"] == {"issuing-ca": "python"}
    edit_config(demo, 'backend = "auto"', 'backend = "native"')
    (demo.root / "state" / "journal.sqlite").unlink()
    code, summary = run_json(demo, env=env)
    assert code == 1 and summary["published"] == 0
    assert 'signing.backend = "native", but the extension ocspmint._p11native does not import' in \
        summary["failures"][0]["message"]


def test_signing_config_is_checked(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    set_signing(demo, sessions=0)
    p = ocspmint(demo, "run")
    assert p.returncode == 2 and "$.signing.sessions" in p.stderr
    edit_config(demo, "sessions = 0", 'backend = "rust"')
    p = ocspmint(demo, "run")
    assert p.returncode == 2 and "$.signing.backend" in p.stderr


# --------------------------------------------------------------------------
# software-key signer (key_file)


def use_key_file(demo: Demo, key_file: str, extra: str = "") -> None:
    """Replace the demo's [issuers.signer] table with a key_file signer
    (no signer cert: the issuing CA signs)."""
    text = demo.config.read_text()
    head, _, rest = text.partition("[issuers.signer]\n")
    _, _, tail = rest.partition("\n\n")
    demo.config.write_text(f'{head}[issuers.signer]\nkey_file = "{key_file}"\n{extra}\n{tail}')


def test_software_key_signs_end_to_end_and_openssl_verifies(tmp_path):
    demo = build_demo(tmp_path, certs=4, precerts=2, revoke=2)
    key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    encrypted = demo.root / "ca" / "issuing-ca.enc.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"s3cret-pw")))
    use_key_file(demo, "ca/issuing-ca.enc.key", 'key_password_env = "OCSPMINT_TEST_KEY_PW"')
    p = ocspmint(demo, "run", "--json", "--quiet", env={"OCSPMINT_TEST_KEY_PW": "s3cret-pw"})
    summary = json.loads(p.stdout)
    assert p.returncode == 0 and summary["ok"], summary["failures"]
    assert summary["published"] == summary["verified"] == len(unexpired(demo))
    assert summary["signer_backend"] == {"issuing-ca": "software-key"}
    warnings = [line for line in p.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "not for production CA keys" in warnings[0] and "issuing-ca.enc.key" in warnings[0]
    assert "s3cret-pw" not in p.stdout + p.stderr
    for serial in unexpired(demo):
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified, view.text
        assert view.status == ("revoked" if serial in demo.revoked else "good"), view.text
    resp = ocsp.load_der_ocsp_response(response_path(demo, demo.serials["good"][0]).read_bytes())
    assert resp.certificates == []  # the CA signs: no delegated responder certificate
    assert verify_clean(demo) == len(unexpired(demo))


def test_software_key_not_matching_the_certificate_is_refused_naming_the_file(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=1, revoke=0)
    use_key_file(demo, "ca/leaf.key")
    code, summary = run_json(demo)
    assert code == 1 and summary["published"] == 0 and len(summary["failures"]) == 3
    leaf, ca = demo.root / "ca" / "leaf.key", demo.issuing_ca
    assert summary["failures"][0]["message"] == (f"issuer issuing-ca: key file {leaf} does not match the signer "
                                                 f"certificate {ca} (different public key)")
    assert file_objects(demo) == {} and journal_rows(demo) == {}


def test_software_key_config_rules(tmp_path):
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    edit_config(demo, "[issuers.signer]\n", '[issuers.signer]\nkey_file = "ca/issuing-ca.key"\n')
    p = ocspmint(demo, "run")
    assert p.returncode == 2 and "$.issuers[0].signer.key_file" in p.stderr and "excludes uri" in p.stderr
