"""Tests for the p11fault PKCS#11 fault-injection shim (tests/p11fault/).

Everything is real: the shim is compiled with gcc, it forwards to SoftHSM2,
the token lives in tmp, and python-pkcs11 drives it.  python-pkcs11 loads a
PKCS#11 module once per process and the shim reads its fault schedule once per
process, so every scenario runs in its own child interpreter (CHILD_PRELUDE +
a scenario snippet) that prints a JSON result for the parent to check.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import load_der_public_key

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SHIM_DIR = Path(__file__).resolve().parent / "p11fault"
USER_PIN = "1234"

# tests/ is not a package; load the builder by path.
_spec = importlib.util.spec_from_file_location("p11fault_build", SHIM_DIR / "build.py")
assert _spec is not None and _spec.loader is not None
p11fault_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(p11fault_build)

pytestmark = pytest.mark.skipif(
    not (
        Path(SOFTHSM_MODULE).is_file()
        and shutil.which("softhsm2-util")
        and shutil.which("gcc")
    ),
    reason="needs SoftHSM2 (libsofthsm2.so, softhsm2-util) and gcc",
)

FATAL = {"DeviceError", "DeviceRemoved", "SessionClosed", "SessionHandleInvalid", "TokenNotPresent"}


def digest(i: int) -> bytes:
    """The SHA-256 digest signed as 'message i' (CKM_ECDSA signs a digest)."""
    return hashlib.sha256(b"ocsp-response-%d" % i).digest()


CHILD_PRELUDE = textwrap.dedent(
    '''
    import hashlib, json, os, sys, time
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.exceptions import PKCS11Error

    lib = pkcs11.lib(os.environ["TEST_P11_LIB"])
    tok = lib.get_token(token_label="t")
    PIN = "1234"
    out = {"pid": os.getpid()}

    def digest(i):
        return hashlib.sha256(b"ocsp-response-%d" % i).digest()

    def err(exc):
        return {"err": type(exc).__name__}

    def ec_key(session):
        return session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="k")

    def sign(key, i):
        """One signature attempt: {"i", "sig"} or {"i", "err"}."""
        try:
            return {"i": i, "sig": key.sign(digest(i), mechanism=Mechanism.ECDSA).hex()}
        except PKCS11Error as exc:
            return {"i": i, **err(exc)}

    def rsa_sign(s, i):
        """One multi-part RSA signature (C_SignUpdate + C_SignFinal)."""
        k = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="r")
        parts = iter([b"part-a-%d" % i, b"part-b-%d" % i])
        try:
            return {"i": i, "sig": k.sign(parts, mechanism=Mechanism.SHA256_RSA_PKCS).hex()}
        except PKCS11Error as exc:
            return {"i": i, **err(exc)}

    def call(fn):
        try:
            fn()
            return "ok"
        except PKCS11Error as exc:
            return type(exc).__name__
    '''
)
CHILD_EPILOGUE = "\nprint(json.dumps(out))\n"


@dataclass
class Token:
    conf: Path
    ec_public: ec.EllipticCurvePublicKey
    rsa_public: rsa.RSAPublicKey


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return p11fault_build.build_shim(tmp_path_factory.mktemp("p11fault-build"))


def run_child(
    shim: Path,
    conf: Path,
    code: str,
    *,
    lib: Path | str | None = None,
    module: str | None = SOFTHSM_MODULE,
    timeout: float = 120,
    **faults: str,
) -> dict:
    """Run CHILD_PRELUDE + code in a fresh interpreter with the shim loaded
    and P11FAULT_<NAME>=value for every keyword in ``faults``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P11FAULT_")}
    env["SOFTHSM2_CONF"] = str(conf)
    env["TEST_P11_LIB"] = str(lib or shim)
    if module is not None:
        env["P11FAULT_MODULE"] = module
    for name, value in faults.items():
        env[f"P11FAULT_{name.upper()}"] = str(value)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code) + CHILD_EPILOGUE],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory, shim: Path) -> Token:
    """A fresh SoftHSM2 token 't' (user PIN 1234) with an EC P-256 key 'k'
    and an RSA-2048 key 'r', generated through the shim without faults."""
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "t",
         "--pin", USER_PIN, "--so-pin", "5678"],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
    )
    res = run_child(
        shim,
        conf,
        """
        from pkcs11.util.ec import encode_named_curve_parameters, encode_ec_public_key
        with tok.open(rw=True, user_pin=PIN) as s:
            params = s.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            pub, _ = params.generate_keypair(store=True, label="k")
            rpub, _ = s.generate_keypair(KeyType.RSA, 2048, store=True, label="r")
            out["ec_spki"] = encode_ec_public_key(pub).hex()
            out["rsa_n"] = str(int.from_bytes(rpub[Attribute.MODULUS], "big"))
            out["rsa_e"] = str(int.from_bytes(rpub[Attribute.PUBLIC_EXPONENT], "big"))
        """,
    )
    ec_public = load_der_public_key(bytes.fromhex(res["ec_spki"]))
    assert isinstance(ec_public, ec.EllipticCurvePublicKey)
    assert ec_public.curve.name == "secp256r1"
    rsa_public = rsa.RSAPublicNumbers(int(res["rsa_e"]), int(res["rsa_n"])).public_key()
    return Token(conf, ec_public, rsa_public)


@pytest.fixture
def child(shim: Path, token: Token):
    def run(code: str, **kw) -> dict:
        return run_child(shim, token.conf, code, **kw)

    return run


THREE_SIGNATURES = """
with tok.open(user_pin=PIN) as s:
    k = ec_key(s)
    out["results"] = [sign(k, i) for i in range(1, 4)]
"""  # a child script: three signatures with the EC key, one session


def assert_verifies(token: Token, result: dict) -> None:
    """result is a sign() record {"i", "sig"}: check the raw r||s signature
    over digest(i) against the exported public key."""
    assert "sig" in result, f"expected a signature, got {result}"
    raw = bytes.fromhex(result["sig"])
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    token.ec_public.verify(der, digest(result["i"]), ec.ECDSA(Prehashed(hashes.SHA256())))


def read_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --------------------------------------------------------------------------
# (a) no faults


def test_no_faults_signatures_verify(child, token: Token, shim: Path, tmp_path: Path):
    log = tmp_path / "faults.log"
    res = child(
        """
        maps = open("/proc/self/maps").read()
        out["shim_loaded"] = os.environ["TEST_P11_LIB"] in maps
        out["softhsm_loaded"] = "libsofthsm2.so" in maps
        with tok.open(user_pin=PIN) as s:
            k = ec_key(s)
            out["results"] = [sign(k, i) for i in range(1, 6)]
        """,
        log=log,
    )
    assert res["shim_loaded"] and res["softhsm_loaded"]
    assert len(res["results"]) == 5
    for r in res["results"]:
        assert_verifies(token, r)
    # a signature over another message must not verify (the check is real)
    bad = dict(res["results"][0], i=99)
    with pytest.raises(InvalidSignature):
        assert_verifies(token, bad)
    assert read_log(log) == []


def test_only_c_getfunctionlist_is_exported(shim: Path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not available")
    out = subprocess.run(
        [nm, "-D", "--defined-only", str(shim)], check=True, capture_output=True, text=True
    ).stdout
    assert [line.split()[-1] for line in out.splitlines() if line.strip()] == ["C_GetFunctionList"]


def test_build_is_cached(shim: Path):
    assert p11fault_build.build_shim(shim.parent) == shim


# --------------------------------------------------------------------------
# (b) FAIL_AT=3: one faulted signature kills its session, a fresh one works


def test_fail_at_3_kills_only_that_session(child, token: Token, tmp_path: Path):
    log = tmp_path / "faults.log"
    res = child(
        """
        s = tok.open(user_pin=PIN)
        k = ec_key(s)
        out["first"] = [sign(k, 1), sign(k, 2), sign(k, 3)]
        # a caller that retries on the SAME session keeps failing ...
        out["same_session_retry"] = sign(k, 3)
        out["same_session_find"] = call(lambda: ec_key(s))
        out["same_session_attr"] = call(lambda: k[Attribute.LABEL])
        out["same_session_close"] = call(s.close)
        # ... only a fresh session recovers (login works again: the real
        # session was closed, so the token dropped its login state)
        with tok.open(user_pin=PIN) as s2:
            k2 = ec_key(s2)
            out["fresh"] = [sign(k2, 4), sign(k2, 5)]
        """,
        sign_fail_at="3",
        log=log,
    )
    ok1, ok2, bad = res["first"]
    assert_verifies(token, ok1)
    assert_verifies(token, ok2)
    assert bad == {"i": 3, "err": "DeviceError"}
    assert res["same_session_retry"] == {"i": 3, "err": "SessionHandleInvalid"}
    assert res["same_session_find"] == "SessionHandleInvalid"
    assert res["same_session_attr"] == "SessionHandleInvalid"
    assert res["same_session_close"] == "SessionHandleInvalid"
    for r in res["fresh"]:
        assert_verifies(token, r)
    assert read_log(log) == [f"{res['pid']} sign#3 rv=0x30"]


def test_fail_at_list_counts_signature_attempts_across_sessions(child, token: Token):
    """Attempts are numbered per process, across sessions; attempts rejected
    because their session is already dead are not numbered."""
    res = child(
        """
        results = []
        s = tok.open(user_pin=PIN)
        k = ec_key(s)
        for i in range(1, 9):
            r = sign(k, i)
            results.append(r)
            if "err" in r:
                assert sign(k, i)["err"] == "SessionHandleInvalid"  # not counted
                s = tok.open(user_pin=PIN)
                k = ec_key(s)
        out["results"] = results
        """,
        sign_fail_at="2,3, 6",
    )
    errs = [r["i"] for r in res["results"] if "err" in r]
    assert errs == [2, 3, 6]
    for r in res["results"]:
        if r["i"] not in errs:
            assert_verifies(token, r)


# --------------------------------------------------------------------------
# (c) FAIL_FROM=2: a permanent fault


def test_fail_from_2_is_permanent(child, token: Token, tmp_path: Path):
    log = tmp_path / "faults.log"
    res = child(
        """
        s = tok.open(user_pin=PIN)
        out["first"] = sign(ec_key(s), 1)
        out["second"] = sign(ec_key(s), 2)
        out["fresh"] = []
        for i in range(3, 6):
            s = tok.open(user_pin=PIN)   # every fresh session dies too
            out["fresh"].append(sign(ec_key(s), i))
        """,
        sign_fail_from="2",
        log=log,
    )
    assert_verifies(token, res["first"])
    assert res["second"] == {"i": 2, "err": "DeviceError"}
    assert res["fresh"] == [{"i": i, "err": "DeviceError"} for i in range(3, 6)]
    assert read_log(log) == [f"{res['pid']} sign#{n} rv=0x30" for n in range(2, 6)]


# --------------------------------------------------------------------------
# rv -> python-pkcs11 exception, and session-fatal vs. not


# one faulted signature, then a second on the same session
SIGN_TWICE = """
s = tok.open(user_pin=PIN)
k = ec_key(s)
out["faulted"] = sign(k, 1)
out["retry_same_session"] = sign(k, 2)
"""


@pytest.mark.parametrize(
    ("rv", "exc"),
    [
        ("0x30", "DeviceError"),
        ("0x32", "DeviceRemoved"),
        ("0xB0", "SessionClosed"),
        ("0xB3", "SessionHandleInvalid"),
        ("0xE0", "TokenNotPresent"),
        ("0x06", "FunctionFailed"),
        ("0x05", "GeneralError"),
        ("0x31", "DeviceMemory"),
        ("0x101", "UserNotLoggedIn"),
    ],
)
def test_sign_rv_maps_to_exception(child, token: Token, rv: str, exc: str):
    res = child(
        SIGN_TWICE,
        sign_fail_at="1",
        sign_rv=rv,
    )
    assert res["faulted"] == {"i": 1, "err": exc}
    if exc in FATAL:
        assert res["retry_same_session"] == {"i": 2, "err": "SessionHandleInvalid"}
    else:
        # non-fatal: the real operation was terminated, the session is fine
        assert_verifies(token, res["retry_same_session"])


@pytest.mark.parametrize(("rv", "fatal", "dead"), [("0x30", "0", False), ("0x06", "1", True)])
def test_session_fatal_override(child, token: Token, rv: str, fatal: str, dead: bool):
    res = child(
        SIGN_TWICE,
        sign_fail_at="1",
        sign_rv=rv,
        session_fatal=fatal,
    )
    assert "err" in res["faulted"]
    if dead:
        assert res["retry_same_session"] == {"i": 2, "err": "SessionHandleInvalid"}
    else:
        assert_verifies(token, res["retry_same_session"])


# --------------------------------------------------------------------------
# FLIP_AT: the HSM says CKR_OK but the signature is wrong


def flipped(result: dict) -> dict:
    """result with the lowest bit of its signature's last byte flipped back."""
    raw = bytearray.fromhex(result["sig"])
    raw[-1] ^= 0x01
    return dict(result, sig=raw.hex())


def test_flip_at_2_corrupts_only_the_2nd_signature(child, token: Token, tmp_path: Path):
    """python-pkcs11 makes two C_Sign calls per signature (length query, then
    the real one): attempt #2 comes back CKR_OK with one bit flipped, the
    session stays usable, and attempts #1 and #3 verify."""
    log = tmp_path / "faults.log"
    res = child(
        THREE_SIGNATURES,
        sign_flip_at="2",
        log=log,
    )
    first, second, third = res["results"]
    assert_verifies(token, first)
    assert_verifies(token, third)
    assert "sig" in second, second  # no error: the module answered CKR_OK
    with pytest.raises(InvalidSignature):
        assert_verifies(token, second)
    # exactly the lowest bit of the last byte was flipped
    assert_verifies(token, flipped(second))
    assert read_log(log) == [f"{res['pid']} flip#2 rv=0x0"]


def test_flip_at_counts_like_fail_at_and_covers_sign_final(child, token: Token, tmp_path: Path):
    """FLIP_AT and FAIL_AT share one attempt counter; a multi-part signature
    (C_SignUpdate + C_SignFinal(NULL) + C_SignFinal(buf)) is flipped in the
    call that returns it.  RSA PKCS#1 v1.5 is deterministic, so the flipped
    signature is the right one but for its last bit."""
    log = tmp_path / "faults.log"
    res = child(
        """
        with tok.open(user_pin=PIN) as s:
            out["results"] = [rsa_sign(s, i) for i in range(1, 5)]
        """,
        sign_flip_at="3, 1",
        sign_fail_at="2",
        sign_rv="0x06",  # not session-fatal: the session signs on
        log=log,
    )
    r1, r2, r3, r4 = res["results"]
    assert r2 == {"i": 2, "err": "FunctionFailed"}

    def check(r: dict) -> None:
        token.rsa_public.verify(bytes.fromhex(r["sig"]), b"part-a-%d" % r["i"] + b"part-b-%d" % r["i"],
                                padding.PKCS1v15(), hashes.SHA256())

    check(r4)
    for r in (r1, r3):
        with pytest.raises(InvalidSignature):
            check(r)
        check(flipped(r))
    pid = res["pid"]
    assert read_log(log) == [f"{pid} flip#1 rv=0x0", f"{pid} sign#2 rv=0x6", f"{pid} flip#3 rv=0x0"]


# --------------------------------------------------------------------------
# (d) LOGIN_RV


def test_login_rv_raises_pin_incorrect(child, tmp_path: Path):
    log = tmp_path / "faults.log"
    res = child(
        """
        out["login"] = call(lambda: tok.open(user_pin=PIN))
        out["login_again"] = call(lambda: tok.open(user_pin=PIN))
        # a public session still opens, but the private key is not visible
        with tok.open() as s:
            try:
                ec_key(s)
                out["public_key_lookup"] = "found"
            except Exception as exc:
                out["public_key_lookup"] = type(exc).__name__
        """,
        login_rv="0xA0",
        log=log,
    )
    assert res["login"] == "PinIncorrect"
    assert res["login_again"] == "PinIncorrect"
    assert res["public_key_lookup"] == "NoSuchKey"
    pid = res["pid"]
    assert read_log(log) == [f"{pid} login#1 rv=0xa0", f"{pid} login#2 rv=0xa0"]


@pytest.mark.parametrize(("rv", "exc"), [("0xA4", "PinLocked"), ("0x30", "DeviceError")])
def test_login_rv_other_codes(child, rv: str, exc: str):
    res = child('out["login"] = call(lambda: tok.open(user_pin=PIN))', login_rv=rv)
    assert res["login"] == exc


# --------------------------------------------------------------------------
# SESSION_IDLE_MS: a network HSM drops a session left idle too long


def idle_drops(log: Path, pid: int) -> list[int]:
    """The idle milliseconds of the log's lines, which must all be idle#
    lines of process ``pid``."""
    drops = []
    for line in read_log(log):
        m = re.fullmatch(r"(\d+) idle#(\d+) rv=0xb3", line)
        assert m and int(m.group(1)) == pid, line
        drops.append(int(m.group(2)))
    return drops


def test_session_idle_ms_drops_an_idle_session_for_good(child, token: Token, tmp_path: Path):
    """SESSION_IDLE_MS=200: a session used at once signs; after 400 ms with
    no call its next call fails with SessionHandleInvalid, and so does every
    later one; a freshly opened session (with a login: the dropped session's
    real one was closed) signs; a session used every 50 ms for 1 s never
    drops, while one opened next to it and never used does."""
    log = tmp_path / "faults.log"
    res = child(
        """
        s = tok.open(user_pin=PIN)
        k = ec_key(s)
        out["at_once"] = sign(k, 1)
        time.sleep(0.4)
        out["after_idle"] = sign(k, 2)
        out["still_dead"] = [sign(k, 3), call(lambda: ec_key(s)), call(lambda: k[Attribute.LABEL]),
                             call(s.close)]
        s2 = tok.open(user_pin=PIN)
        k2 = ec_key(s2)
        out["fresh"] = sign(k2, 4)
        unused = tok.open()  # the rule is per session: this one sees no call
        busy, end = [], time.monotonic() + 1.0
        while time.monotonic() < end:
            time.sleep(0.05)
            busy.append(sign(k2, 5 + len(busy)))
        out["busy"] = busy
        out["unused"] = call(lambda: unused.generate_random(128))
        out["busy_close"] = call(s2.close)
        """,
        session_idle_ms="200",
        log=log,
    )
    assert_verifies(token, res["at_once"])
    assert res["after_idle"] == {"i": 2, "err": "SessionHandleInvalid"}
    assert res["still_dead"] == [{"i": 3, "err": "SessionHandleInvalid"}] + ["SessionHandleInvalid"] * 3
    assert_verifies(token, res["fresh"])
    assert len(res["busy"]) >= 10
    for r in res["busy"]:
        assert_verifies(token, r)
    assert res["unused"] == "SessionHandleInvalid"
    assert res["busy_close"] == "ok"
    # one line per dropped session, when the drop was noticed, with its idle time
    first, unused = idle_drops(log, res["pid"])
    assert first >= 400 and unused >= 1000


def test_session_idle_ms_clock_starts_at_open_and_a_drop_ends_the_login(child, token: Token, tmp_path: Path):
    """The idle clock starts at C_OpenSession.  A session gone idle is
    dropped before the next C_OpenSession or C_Login even if it is never
    called again, as a network HSM drops it when its timer expires: with it
    goes the token's login state, so a new login works (with the idle
    session still open it would raise UserAlreadyLoggedIn)."""
    log = tmp_path / "faults.log"
    res = child(
        """
        s = tok.open(user_pin=PIN)  # logged in, then left alone
        time.sleep(0.3)
        s2 = tok.open(user_pin=PIN)
        out["fresh"] = sign(ec_key(s2), 1)
        out["dropped"] = call(lambda: ec_key(s))
        quiet = tok.open()  # opened, never called
        time.sleep(0.3)
        out["quiet"] = call(lambda: quiet.generate_random(128))
        """,
        session_idle_ms="200",
        log=log,
    )
    assert_verifies(token, res["fresh"])
    assert res["dropped"] == res["quiet"] == "SessionHandleInvalid"
    assert [ms >= 300 for ms in idle_drops(log, res["pid"])] == [True, True]


# --------------------------------------------------------------------------
# (e) the fault log, per process


def test_log_lines_per_process(shim: Path, token: Token, tmp_path: Path):
    """Two processes with the same schedule each fault their own 2nd and 4th
    attempt and append to the same log."""
    log = tmp_path / "faults.log"
    code = """
        results = []
        for i in range(1, 6):
            with tok.open(user_pin=PIN) as s:
                results.append(sign(ec_key(s), i))
        out["results"] = results
        """
    # SESSION_FATAL=0 so that the `with` block can close the session cleanly
    runs = [
        run_child(shim, token.conf, code, sign_fail_at="2,4", sign_rv="0xB3",
                  session_fatal="0", log=log)
        for _ in range(2)
    ]
    expected = []
    for res in runs:
        assert [r.get("err") for r in res["results"]] == [
            None, "SessionHandleInvalid", None, "SessionHandleInvalid", None
        ]
        expected += [f"{res['pid']} sign#2 rv=0xb3", f"{res['pid']} sign#4 rv=0xb3"]
    assert runs[0]["pid"] != runs[1]["pid"]
    assert read_log(log) == expected
    for line in read_log(log):
        assert re.fullmatch(r"\d+ sign#\d+ rv=0x[0-9a-f]+", line)


def test_forked_child_counts_from_one(child, token: Token, tmp_path: Path):
    """After fork() the child numbers its own attempts from 1 (as a forked
    worker process would); the parent's count is unaffected."""
    log = tmp_path / "faults.log"
    res = child(
        """
        s = tok.open(user_pin=PIN)
        k = ec_key(s)
        out["parent"] = [sign(k, 1)]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, json.dumps([sign(k, 2), sign(k, 3)]).encode())
            os._exit(0)
        os.close(w)
        out["forked"] = json.loads(os.read(r, 65536))
        os.waitpid(pid, 0)
        out["child_pid"] = pid
        out["parent"].append(sign(k, 4))
        """,
        sign_fail_at="2",
        log=log,
    )
    assert_verifies(token, res["parent"][0])
    assert_verifies(token, res["forked"][0])
    assert res["forked"][1] == {"i": 3, "err": "DeviceError"}
    assert res["parent"][1] == {"i": 4, "err": "DeviceError"}
    assert sorted(read_log(log)) == sorted(
        [f"{res['child_pid']} sign#2 rv=0x30", f"{res['pid']} sign#2 rv=0x30"]
    )


# --------------------------------------------------------------------------
# delay, multi-part signing, threads, configuration errors


def test_sign_delay_applies_once_per_signature(child, token: Token, tmp_path: Path):
    log = tmp_path / "faults.log"
    res = child(
        THREE_SIGNATURES,
        sign_delay_us="1000",
        log=log,
    )
    for r in res["results"]:
        assert_verifies(token, r)
    # python-pkcs11 makes 2 C_Sign calls per signature (length query, then
    # the real one); the delay belongs to the attempt, so 3 delays, not 6
    assert [line.split(" ", 1)[1] for line in read_log(log)] == [f"delay#{n} rv=0x0" for n in (1, 2, 3)]


def test_multipart_sign_counts_once(child, token: Token):
    """key.sign(iterable) uses C_SignUpdate + C_SignFinal (length query +
    real call): that is one attempt too."""
    res = child(
        """
        s = tok.open(user_pin=PIN)
        out["results"] = [rsa_sign(s, 1), rsa_sign(s, 2)]
        with tok.open(user_pin=PIN) as s2:
            out["results"].append(rsa_sign(s2, 3))
        """,
        sign_fail_at="2",
    )
    r1, r2, r3 = res["results"]
    assert r2 == {"i": 2, "err": "DeviceError"}
    for r in (r1, r3):
        token.rsa_public.verify(
            bytes.fromhex(r["sig"]),
            b"part-a-%d" % r["i"] + b"part-b-%d" % r["i"],
            padding.PKCS1v15(),
            hashes.SHA256(),
        )


def test_counter_is_thread_safe(child, token: Token, tmp_path: Path):
    """8 threads x 25 signatures, each thread on its own session: exactly the
    scheduled attempt numbers fail, each exactly once.  (Fault rv 0x06 is not
    session-fatal, so every thread keeps its session.)"""
    log = tmp_path / "faults.log"
    res = child(
        """
        import threading
        login = tok.open(user_pin=PIN)      # login state is token-wide
        results, lock = [], threading.Lock()
        barrier = threading.Barrier(8)
        def worker(t):
            s = tok.open()
            k = ec_key(s)
            barrier.wait()
            mine = [sign(k, t * 1000 + n) for n in range(25)]
            with lock:
                results.extend(mine)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for th in threads: th.start()
        for th in threads: th.join()
        out["results"] = results
        """,
        sign_fail_at="5,50,100,150,200",
        sign_rv="0x06",
        sign_delay_us="200",
        # python-pkcs11 calls C_Initialize(NULL), which makes SoftHSM2 turn
        # its own locking off: threads would corrupt its heap with or without
        # the shim.  OS_LOCKING=1 makes the shim ask for CKF_OS_LOCKING_OK.
        os_locking="1",
        log=log,
    )
    results = res["results"]
    assert len(results) == 200
    failed = [r for r in results if "err" in r]
    assert [r["err"] for r in failed] == ["FunctionFailed"] * 5
    for r in results:
        if "sig" in r:
            assert_verifies(token, r)
    lines = read_log(log)
    assert sorted(int(m.group(1)) for line in lines if (m := re.search(r" sign#(\d+)", line))) == [
        5, 50, 100, 150, 200
    ]
    # every attempt number was given out once, and delayed once
    assert sorted(int(m.group(1)) for line in lines if (m := re.search(r" delay#(\d+)", line))) == list(range(1, 201))


SIGN_WHEN_GO = """
    import threading
    with tok.open(user_pin=PIN) as s:
        k = ec_key(s)
        sign(k, 0)
        keys = [ec_key(tok.open()) for _ in range(int(os.environ["THREADS"]))]
        print("ready", flush=True)
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.002)
        spans, lock = [], threading.Lock()
        def worker(t):
            for n in range(int(os.environ["EACH"])):
                t0 = time.monotonic()
                r = sign(keys[t], 100 * t + n + 1)
                with lock:
                    spans.append([t0, time.monotonic(), r])
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(keys))]
        for th in threads: th.start()
        for th in threads: th.join()
        out["spans"] = spans
"""


def _sign_together(shim: Path, conf: Path, tmp: Path, children: list[dict], *, threads: int = 1,
                   each: int = 1) -> list[dict]:
    """One child per ``children`` entry (its P11FAULT_* settings), started
    one after the other (each logs in before the next starts: SoftHSM2
    rewrites its token file on C_Login); then all of them sign at once,
    ``threads`` threads x ``each`` signatures per child (SIGN_WHEN_GO).
    Returns their JSON results."""
    go = tmp / "go"
    procs = []
    try:
        for faults in children:
            env = {k: v for k, v in os.environ.items() if not k.startswith("P11FAULT_")}
            env.update(SOFTHSM2_CONF=str(conf), TEST_P11_LIB=str(shim), P11FAULT_MODULE=SOFTHSM_MODULE,
                       GO=str(go), THREADS=str(threads), EACH=str(each))
            env.update({f"P11FAULT_{k.upper()}": str(v) for k, v in faults.items()})
            p = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(SIGN_WHEN_GO) + CHILD_EPILOGUE],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr and p.stderr.read()
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _union(spans: list[list]) -> float:
    total, end = 0.0, float("-inf")
    for a, b, _ in sorted(spans, key=lambda s: s[0]):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def test_sign_slots_limit_how_many_delays_run_at_once(shim: Path, token: Token, tmp_path: Path):
    """8 threads sign at once with a 0.1 s delay: with 2 slots the delays
    take at least 4 rounds (a lower bound set by the sleeps themselves;
    no upper bound is asserted: tests never assert speed)."""
    faults = {"sign_delay_us": "100000", "os_locking": "1"}
    (limited,) = _sign_together(shim, token.conf, tmp_path, [{**faults, "sign_slots": "2"}], threads=8)
    (tmp_path / "go").unlink()
    (free,) = _sign_together(shim, token.conf, tmp_path, [{**faults, "sign_slots": "8"}], threads=8)
    for res in (limited, free):
        assert len(res["spans"]) == 8
        for _, _, r in res["spans"]:
            assert_verifies(token, r)
    assert _union(limited["spans"]) >= 0.4


def test_named_sign_slots_are_shared_between_processes(shim: Path, token: Token, tmp_path: Path):
    """Two processes, one named slot: their 3 + 3 delays of 0.1 s never
    overlap, so the signing spans cover at least 0.6 s."""
    name = f"/p11fault-test-{os.getpid()}"
    Path("/dev/shm", f"sem.{name[1:]}").unlink(missing_ok=True)
    faults = {"sign_delay_us": "100000", "sign_slots": "1", "sign_slots_name": name}
    try:
        results = _sign_together(shim, token.conf, tmp_path, [faults, faults], each=3)
    finally:
        Path("/dev/shm", f"sem.{name[1:]}").unlink(missing_ok=True)
    spans = [s for res in results for s in res["spans"]]
    assert len(spans) == 6
    for _, _, r in spans:
        assert_verifies(token, r)
    assert _union(spans) >= 0.6


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"module": None}, "P11FAULT_MODULE is not set"),
        ({"module": "/nonexistent/libnothing.so"}, "dlopen(/nonexistent/libnothing.so)"),
        ({"sign_fail_at": "3,x"}, "P11FAULT_SIGN_FAIL_AT: invalid number"),
        ({"sign_fail_at": "0"}, "1-based"),
        ({"sign_flip_at": "2,x"}, "P11FAULT_SIGN_FLIP_AT: invalid number"),
        ({"sign_flip_at": "0"}, "P11FAULT_SIGN_FLIP_AT: numbers are 1-based"),
        ({"sign_flip_at": ","}, "P11FAULT_SIGN_FLIP_AT: empty list"),
        ({"sign_fail_from": "-1"}, "P11FAULT_SIGN_FAIL_FROM: invalid number"),
        ({"sign_rv": "0"}, "P11FAULT_SIGN_RV: must not be CKR_OK"),
        ({"session_fatal": "yes"}, "P11FAULT_SESSION_FATAL"),
        ({"login_rv": "nope"}, "P11FAULT_LOGIN_RV: invalid number"),
        ({"os_locking": "yes"}, "P11FAULT_OS_LOCKING"),
        ({"sign_delay_us": "10", "sign_slots": "0"}, "P11FAULT_SIGN_SLOTS: expected 1.."),
        ({"sign_slots": "2"}, "P11FAULT_SIGN_SLOTS needs P11FAULT_SIGN_DELAY_US"),
        ({"sign_delay_us": "10", "sign_slots_name": "/x"}, "P11FAULT_SIGN_SLOTS_NAME needs P11FAULT_SIGN_SLOTS"),
        ({"sign_delay_us": "10", "sign_slots": "2", "sign_slots_name": "x/y"}, "expected '/name'"),
        ({"session_idle_ms": "0"}, "P11FAULT_SESSION_IDLE_MS: must be at least 1"),
        ({"session_idle_ms": "1s"}, "P11FAULT_SESSION_IDLE_MS: invalid number"),
    ],
)
def test_bad_configuration_fails_loading(shim: Path, token: Token, faults: dict, message: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("P11FAULT_")}
    env["SOFTHSM2_CONF"] = str(token.conf)
    module = faults.pop("module", SOFTHSM_MODULE)
    if module is not None:
        env["P11FAULT_MODULE"] = module
    for name, value in faults.items():
        env[f"P11FAULT_{name.upper()}"] = value
    code = textwrap.dedent(
        f"""
        import pkcs11
        try:
            pkcs11.lib({str(shim)!r})
        except pkcs11.exceptions.GeneralError:
            print("GeneralError")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "GeneralError"
    assert message in proc.stderr


def test_build_failure_reports_gcc_stderr(tmp_path: Path):
    broken = tmp_path / "p11fault.c"
    broken.write_text("int this_is_not_c(void) { return nope; }\n")
    with pytest.raises(p11fault_build.ShimBuildError, match="nope"):
        p11fault_build.build_shim(tmp_path / "out", source=broken)
    assert not any((tmp_path / "out").iterdir())
