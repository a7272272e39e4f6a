"""ocspmint.demo builds a real openssl CA and SoftHSM2 token; check what it made."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from conftest import softhsm_env
from ocspmint import demo as demo_mod
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, issue, revoke
from ocspmint.issuer import load_issuers

UTC = dt.timezone.utc
POISON = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.3")
OCSP_NOCHECK = x509.ObjectIdentifier("1.3.6.1.5.5.7.48.1.5")


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _index(demo: Demo) -> dict[int, list[str]]:
    """index.txt rows by serial: [status, expiry, revocation, serial, file, subject]."""
    rows: dict[int, list[str]] = {}
    for line in demo.index.read_text().splitlines():
        cols = line.split("\t")
        assert len(cols) == 6, line
        serial = int(cols[3], 16)
        assert serial not in rows, f"duplicate serial {cols[3]}"
        rows[serial] = cols
    return rows


# PKCS#11 in a child process: SoftHSM2 reads SOFTHSM2_CONF once per process,
# and each demo has its own token folder.
_TOKEN_CHILD = r"""
import hashlib, json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature
req = json.load(sys.stdin)
pin = open(req["pin_file"]).read().strip()
data = bytes.fromhex(req["data"])
out = {}
token = pkcs11.lib(req["module"]).get_token(token_label="ocspmint")
with token.open(user_pin=pin) as s:
    for label in ("ocsp-responder", "issuing-ca"):
        key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        if key.key_type == KeyType.EC:
            sig = encode_ecdsa_signature(key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))
            kind = "ec"
        else:
            sig = key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
            kind = "rsa"
        out[label] = {
            "kind": kind, "sig": sig.hex(), "id": key[Attribute.ID].hex(),
            "token": bool(key[Attribute.TOKEN]), "sensitive": bool(key[Attribute.SENSITIVE]),
            "extractable": bool(key[Attribute.EXTRACTABLE]),
            "never_extractable": bool(key[Attribute.NEVER_EXTRACTABLE]),
            "local": bool(key[Attribute.LOCAL]),
        }
        try:
            key[Attribute.VALUE]
            out[label]["value_readable"] = True
        except pkcs11.PKCS11Error:
            out[label]["value_readable"] = False
json.dump(out, sys.stdout)
"""


def _token_sign(demo: Demo, data: bytes) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", _TOKEN_CHILD],
        input=json.dumps({"module": demo_mod.SOFTHSM_MODULE, "pin_file": str(demo.pin_file), "data": data.hex()}),
        env=softhsm_env(demo), capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _verify(cert: x509.Certificate, sig: bytes, data: bytes) -> None:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(sig, hashlib.sha256(data).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())


# --- one demo per responder key type (P-256 is the session demo) -------------

KEY_CASES = [("ec-p256", "delegated"), ("ec-p384", "delegated"), ("rsa-2048", "issuer")]


@pytest.fixture(scope="module", params=KEY_CASES, ids=[f"{k}-{s}" for k, s in KEY_CASES])
def any_demo(request, demo: Demo, tmp_path_factory) -> tuple[Demo, str, str]:
    key, signer = request.param
    if (key, signer) == ("ec-p256", "delegated"):
        return demo, key, signer
    d = build_demo(tmp_path_factory.mktemp(f"demo-{key}"), certs=3, precerts=2, revoke=1,
                   responder_key=key, signer=signer)
    return d, key, signer


# --- layout, config, secrets -------------------------------------------------


def test_layout_pin_and_softhsm_conf(demo: Demo) -> None:
    for p in (demo.config, demo.softhsm_conf, demo.pin_file, demo.root_ca, demo.issuing_ca, demo.issuing_key,
              demo.responder_cert, demo.index, demo.openssl_cnf):
        assert p.is_file(), p
        assert p.is_absolute() and p.is_relative_to(demo.root)
    assert demo.certs_dir.is_dir()
    assert stat.S_IMODE(demo.pin_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(demo.issuing_key.stat().st_mode) == 0o600
    pin = demo.pin_file.read_text().strip()
    assert len(pin) == 32 and int(pin, 16) >= 0
    conf = dict(line.split(" = ", 1) for line in demo.softhsm_conf.read_text().splitlines())
    assert conf == {"directories.tokendir": str(demo.root / "tokens"), "objectstore.backend": "file",
                    "log.level": "ERROR"}
    assert any((demo.root / "tokens").iterdir()), "token folder is empty"
    # The PIN appears nowhere but pin.txt, and SOFTHSM2_CONF did not leak.
    for p in demo.root.rglob("*"):
        if p.is_file() and p != demo.pin_file and "tokens" not in p.parts:
            assert pin.encode() not in p.read_bytes(), p
    assert os.environ.get("SOFTHSM2_CONF") != str(demo.softhsm_conf)


def test_config_loads_and_names_the_token_key(any_demo) -> None:
    d, _, signer = any_demo
    cfg = load_config(d.config)
    assert [i.name for i in cfg.issuers] == ["issuing-ca"]
    issuer = cfg.issuers[0]
    assert issuer.cert == str(d.issuing_ca)
    assert issuer.signer.module == "/usr/lib/softhsm/libsofthsm2.so"
    assert issuer.signer.pin_file == str(d.pin_file)
    if signer == "delegated":
        assert issuer.signer.uri == "pkcs11:token=ocspmint;object=ocsp-responder;type=private"
        assert issuer.signer.cert == str(d.responder_cert)
    else:
        assert issuer.signer.uri == "pkcs11:token=ocspmint;object=issuing-ca;type=private"
        assert issuer.signer.cert == ""
    [src] = cfg.sources
    assert (src.type, src.path, src.certs_dir, src.issuer) == ("openssl-index", str(d.index), str(d.certs_dir),
                                                               "issuing-ca")
    assert cfg.state_dir == str(d.root / "state")
    assert cfg.store.url == "file:" + str(d.root / "responses")
    assert cfg.signing.workers == 2
    # The project's own identity loader accepts the hierarchy.
    ident = load_issuers(cfg)["issuing-ca"]
    assert ident.signer.delegated is (signer == "delegated")


# --- the openssl ca database -------------------------------------------------


def test_index_rows_match_bookkeeping(demo: Demo) -> None:
    rows = _index(demo)
    assert {r[0] for r in rows.values()} == {"V", "R", "E"}
    s = demo.serials
    assert set(s) == {"good", "revoked", "precert", "expired"}
    assert (len(s["good"]), len(s["revoked"]), len(s["precert"]), len(s["expired"])) == (8, 5, 6, 1)
    assert set(rows) == set(s["good"]) | set(s["revoked"]) | set(s["precert"]) | set(s["expired"])
    assert not set(s["good"]) & set(s["revoked"])
    for serial in s["good"]:
        status, expiry, revocation, _, _, subject = rows[serial]
        assert (status, revocation) == ("V", "")
        assert dt.datetime.strptime(expiry, "%y%m%d%H%M%SZ").replace(tzinfo=UTC) > dt.datetime.now(UTC)
        assert subject.startswith("/C=XX/O=ocspmint demo/CN=leaf-")
    for serial, reason in demo.revoked.items():
        status, _, revocation, *_ = rows[serial]
        assert status == "R"
        when, _, got = revocation.partition(",")
        dt.datetime.strptime(when, "%y%m%d%H%M%SZ")
        assert (got or None) == reason
    assert set(demo.revoked) == set(s["revoked"])
    assert sorted(r for r in demo.revoked.values() if r) == sorted(
        ["keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged"])
    assert list(demo.revoked.values()).count(None) == 1
    assert set(s["precert"]) & set(s["revoked"]), "no revoked precertificate"
    [expired] = s["expired"]
    assert rows[expired][:3] == ["E", "200201000000Z", ""]
    cert = _load(demo.cert_path(expired))
    assert cert.not_valid_before_utc == dt.datetime(2020, 1, 1, tzinfo=UTC)
    assert cert.not_valid_after_utc == dt.datetime(2020, 2, 1, tzinfo=UTC)


def test_newcerts_hold_every_serial_with_the_right_profile(demo: Demo) -> None:
    ca = _load(demo.issuing_ca)
    precerts = set(demo.serials["precert"])
    rows = _index(demo)
    assert len(list(demo.certs_dir.glob("*.pem"))) == len(rows)
    for serial in rows:
        cert = _load(demo.cert_path(serial))
        assert cert.serial_number == serial
        cert.verify_directly_issued_by(ca)
        ext = {e.oid: e for e in cert.extensions}
        if serial in precerts:
            assert POISON in ext and ext[POISON].critical
            assert isinstance(ext[POISON].value, x509.PrecertPoison)
        else:
            assert POISON not in ext
        assert ext[ExtensionOID.BASIC_CONSTRAINTS].value.ca is False
        assert ext[ExtensionOID.EXTENDED_KEY_USAGE].value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        assert ext[ExtensionOID.KEY_USAGE].value.digital_signature
        [dns] = ext[ExtensionOID.SUBJECT_ALTERNATIVE_NAME].value.get_values_for_type(x509.DNSName)
        assert dns == f"{'precert' if serial in precerts else 'leaf'}-{serial:x}.example"


def test_random_serials_include_high_bit_ones_with_leading_zero_octet(demo: Demo) -> None:
    serials = demo.serials["good"] + demo.serials["precert"] + demo.serials["revoked"]
    high = [s for s in serials if s.bit_length() == 128]
    low = [s for s in serials if s.bit_length() < 128]
    assert high and low
    assert high[0] in demo.serials["good"] and any(s in demo.serials["precert"] for s in high)
    for s in high:
        tbs = _load(demo.cert_path(s)).tbs_certificate_bytes
        assert b"\x02\x11\x00" + s.to_bytes(16, "big") in tbs  # INTEGER, 17 octets, leading 00


# --- the delegated responder certificate -------------------------------------


def test_responder_certificate_profile(any_demo) -> None:
    d, key, _ = any_demo
    ca = _load(d.issuing_ca)
    cert = _load(d.responder_cert)
    cert.verify_directly_issued_by(ca)
    ext = {e.oid: e for e in cert.extensions}
    assert set(ext) == {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
                        OCSP_NOCHECK, ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
    assert list(ext[ExtensionOID.EXTENDED_KEY_USAGE].value) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    ku = ext[ExtensionOID.KEY_USAGE]
    assert ku.critical and ku.value == x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    nocheck = ext[OCSP_NOCHECK]
    assert not nocheck.critical and isinstance(nocheck.value, x509.OCSPNoCheck)
    assert nocheck.value.public_bytes() == b"\x05\x00"
    assert ext[ExtensionOID.BASIC_CONSTRAINTS].value.ca is False
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = ext[ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value
    assert (aki.key_identifier, aki.authority_cert_issuer, aki.authority_cert_serial_number) == (ca_ski, None, None)
    assert ext[ExtensionOID.SUBJECT_KEY_IDENTIFIER].value == x509.SubjectKeyIdentifier.from_public_key(
        cert.public_key())
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=7) < life <= dt.timedelta(days=30)
    assert cert.serial_number.bit_length() > 64
    assert cert.signature_hash_algorithm.name == "sha256"
    pub = cert.public_key()
    if key == "rsa-2048":
        assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048 and pub.public_numbers().e == 65537
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.curve.name == {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[key]


def test_token_keys_sign_for_their_certificates(any_demo) -> None:
    d, _, _ = any_demo
    data = b"ocspmint demo " + os.urandom(16)
    out = _token_sign(d, data)
    _verify(_load(d.responder_cert), bytes.fromhex(out["ocsp-responder"]["sig"]), data)
    _verify(_load(d.issuing_ca), bytes.fromhex(out["issuing-ca"]["sig"]), data)
    responder, issuer = out["ocsp-responder"], out["issuing-ca"]
    assert responder["id"] == "01" and issuer["id"] == "02"
    for k in (responder, issuer):
        assert k["token"] and k["sensitive"] and not k["extractable"] and not k["value_readable"]
    # Generated inside the token: CKA_LOCAL and CKA_NEVER_EXTRACTABLE hold.
    assert responder["local"] and responder["never_extractable"]


# pkilint: the text format prints "<Validator> @ <path>" then "    <code> (<SEVERITY>)[: message]";
# the exit code is the number of findings printed. JSON is easier to assert on.
# On these certificates it reports one INFO only (pkix.subject_key_identifier_method_1_identified):
# no FATAL, ERROR, WARNING or NOTICE.
def test_pkilint_ocsp_responder_profile(any_demo) -> None:
    d, _, _ = any_demo
    exe = Path(sys.executable).parent / "lint_cabf_serverauth_cert"
    lint = str(exe) if exe.exists() else shutil.which("lint_cabf_serverauth_cert")
    if lint is None:
        pytest.skip("pkilint is not installed")
    p = subprocess.run([lint, "lint", "-f", "JSON", "-t", "OCSP-RESPONDER", str(d.responder_cert)],
                       capture_output=True, text=True, timeout=120)
    assert p.stdout, p.stderr
    findings = [(f["severity"], f["code"], r["node_path"])
                for r in json.loads(p.stdout)["results"] for f in r["finding_descriptions"]]
    assert p.returncode == len(findings)
    bad = [f for f in findings if f[0] in ("FATAL", "ERROR")]
    assert not bad, bad
    assert not [f for f in findings if f[0] in ("WARNING", "NOTICE")], findings


# --- issue() and revoke() on a private demo ----------------------------------


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Demo:
    return build_demo(tmp_path_factory.mktemp("small"), certs=2, precerts=1, revoke=1,
                      extra_serials=[1, 0x80, (1 << 159) | 0x1234, (1 << 152) - 1])


def test_extra_serials_round_trip(small_demo: Demo) -> None:
    rows = _index(small_demo)
    for serial in (1, 0x80, (1 << 159) | 0x1234, (1 << 152) - 1):
        assert serial in small_demo.serials["good"] and rows[serial][0] == "V"
        assert _load(small_demo.cert_path(serial)).serial_number == serial
    assert small_demo.cert_path(1).name == "01.pem"
    assert small_demo.cert_path(0x80).name == "80.pem"
    assert rows[0x80][3] == "80"  # openssl writes the magnitude, no sign octet
    # One precert only: nothing of it is revoked (a good precert must remain).
    assert not set(small_demo.serials["precert"]) & set(small_demo.revoked)


def test_issue_and_revoke(small_demo: Demo) -> None:
    d = small_demo
    s = issue(d, serial=0xC0FFEE, days=10)
    assert s == 0xC0FFEE and s in d.serials["good"]
    cert = _load(d.cert_path(s))
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=10)
    p = issue(d, precert=True)
    assert p in d.serials["precert"] and p.bit_length() <= 128
    assert isinstance(_load(d.cert_path(p)).extensions.get_extension_for_oid(POISON).value, x509.PrecertPoison)
    revoke(d, s, "keyCompromise")
    revoke(d, p, None)
    revoke(d, d.serials["good"][0], "certificateHold")
    rows = _index(d)
    assert rows[s][0] == "R" and rows[s][2].endswith(",keyCompromise")
    assert rows[p][0] == "R" and "," not in rows[p][2]
    assert [r for r in rows.values() if r[2].endswith(",certificateHold")]
    assert s not in d.serials["good"] and s in d.serials["revoked"] and d.revoked[s] == "keyCompromise"
    assert p in d.serials["precert"] and p in d.serials["revoked"] and d.revoked[p] is None
    with pytest.raises(ValueError, match="already"):
        issue(d, serial=s)
    with pytest.raises(ValueError, match="already revoked"):
        revoke(d, s, "superseded")
    with pytest.raises(ValueError, match="reason"):
        revoke(d, d.serials["good"][0], "badReason")
    with pytest.raises(ValueError, match="not issued"):
        revoke(d, 0xDEAD, None)
    for bad in (0, -1, 1 << 160):
        with pytest.raises(ValueError):
            issue(d, serial=bad)
    with pytest.raises(ValueError):
        issue(d, days=0)


def test_build_refuses_bad_arguments_and_existing_demo(small_demo: Demo, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        build_demo(small_demo.root)
    for kwargs in ({"responder_key": "ec-p521"}, {"signer": "ca"}, {"revoke": 5, "certs": 4},
                   {"extra_serials": [0]}, {"extra_serials": [3, 3]}, {"certs": -1}):
        with pytest.raises(ValueError):
            build_demo(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_openssl_failure_is_a_runtime_error_with_stderr(small_demo: Demo) -> None:
    with pytest.raises(RuntimeError, match="command failed .*openssl") as e:
        demo_mod._run(["openssl", "x509", "-in", str(small_demo.root / "missing.pem")])
    assert "missing.pem" in str(e.value)


def test_openssl_verifies_the_chain(demo: Demo) -> None:
    leaf = demo.cert_path(demo.serials["good"][0])
    for cert in (demo.issuing_ca, demo.responder_cert, leaf):
        p = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(demo.root_ca),
                            "-untrusted", str(demo.issuing_ca), str(cert)], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip() == f"{cert}: OK", p.stdout + p.stderr
