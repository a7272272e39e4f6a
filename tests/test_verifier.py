"""Verifier tests: responses made with pyca's OCSPResponseBuilder (an encoder
independent of ours) or hand-spliced DER, signed with software keys."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocspmint import der, verifier
from ocspmint.config import Issuer, Signer
from ocspmint.issuer import IssuerIdentity, issuer_identity
from ocspmint.model import UTC, Kind, LedgerEntry, Reason, Status
from ocspmint.verifier import Expectation, describe, verify_response

NOW = dt.datetime.now(UTC).replace(microsecond=0)
THIS = NOW - dt.timedelta(hours=1)
VALIDITY = dt.timedelta(days=7) - dt.timedelta(seconds=1)
SERIAL = 0x00FF_1234_5678_9ABC_DEF0
REVOKED_AT = NOW - dt.timedelta(days=2)
UNAUTHORIZED = bytes.fromhex("3003 0a01 06")
BASIC_OID = bytes.fromhex("06092b0601050507300101")
KINDS = ("ec-p256", "ec-p384", "rsa-2048")


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@functools.cache
def key(kind: str, n: int = 0) -> PrivateKey:
    if kind == "rsa-2048":
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "ec-p384" else ec.SECP256R1())


def sig_hash(k: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA384() if isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1" else hashes.SHA256()


def make_cert(
    cn: str, k: PrivateKey, issuer: x509.Name, issuer_key: PrivateKey, *, ca: bool, days: int = 365
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:  # digitalSignature: the CA's own key may sign OCSP (BR 7.1.2.10.7)
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:  # the delegated responder profile of BR 7.1.2.8
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        b = b.add_extension(x509.OCSPNoCheck(), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return b.sign(issuer_key, sig_hash(issuer_key))


@dataclass
class PKI:
    issuer: IssuerIdentity
    ca_cert: x509.Certificate
    signer_key: PrivateKey
    signer_cert: x509.Certificate
    delegated: bool


def make_pki(folder: Path, kind: str = "ec-p256", delegated: bool = False, responder_days: int = 30) -> PKI:
    ca_key = key(kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Test CA {kind}")])
    ca = make_cert(f"Test CA {kind}", ca_key, name, ca_key, ca=True, days=3650)
    ca_path = folder / f"ca-{kind}.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    signer_key, signer_cert, signer_path = ca_key, ca, ""
    if delegated:
        signer_key = key(kind, 1)
        signer_cert = make_cert("Test OCSP Responder", signer_key, name, ca_key, ca=False, days=responder_days)
        p = folder / f"responder-{kind}-{responder_days}.pem"
        p.write_bytes(signer_cert.public_bytes(serialization.Encoding.PEM))
        signer_path = str(p)
    ident = issuer_identity(Issuer(name="ca", cert=str(ca_path), signer=Signer(uri="pkcs11:object=x", cert=signer_path)))
    return PKI(ident, ca, signer_key, signer_cert, delegated)


@pytest.fixture(params=[(k, d) for k in KINDS for d in (False, True)], ids=lambda p: f"{p[0]}-{'delegated' if p[1] else 'ca'}")
def pki(request: pytest.FixtureRequest, tmp_path: Path) -> PKI:
    return make_pki(tmp_path, *request.param)


@pytest.fixture
def p256(tmp_path: Path) -> PKI:
    return make_pki(tmp_path, "ec-p256", delegated=False)


@pytest.fixture
def p256d(tmp_path: Path) -> PKI:
    return make_pki(tmp_path, "ec-p256", delegated=True)


class _Default:
    pass


DEFAULT = _Default()


def build(
    p: PKI,
    *,
    serial: int = SERIAL,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    this: dt.datetime = THIS,
    nxt: dt.datetime | None = THIS + VALIDITY,
    revoked_at: dt.datetime | None = None,
    reason: x509.ReasonFlags | None = None,
    alg: str = "sha1",
    key_hash: bytes | None = None,
    by_name: bool = False,
    certs: list[x509.Certificate] | None | _Default = DEFAULT,
    nonce: bool = False,
    sign_with: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A response made by cryptography's OCSPResponseBuilder."""
    ident = p.issuer
    b = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=ident.name_hash[alg],
        issuer_key_hash=key_hash or ident.key_hash[alg],
        serial_number=serial,
        algorithm=hashes.SHA1() if alg == "sha1" else hashes.SHA256(),
        cert_status=status,
        this_update=this,
        next_update=nxt,
        revocation_time=revoked_at,
        revocation_reason=reason,
    )
    enc = ocsp.OCSPResponderEncoding.NAME if by_name else ocsp.OCSPResponderEncoding.HASH
    b = b.responder_id(enc, p.signer_cert)
    cert_list = ([p.signer_cert] if p.delegated else None) if isinstance(certs, _Default) else certs
    if cert_list:
        b = b.certificates(cert_list)
    if nonce:
        b = b.add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
    return b.sign(p.signer_key, sign_with or sig_hash(p.signer_key)).public_bytes(serialization.Encoding.DER)


def wrap(p: PKI, tbs: bytes, certs: list[bytes] | None | _Default = DEFAULT) -> bytes:
    """Sign a hand-made tbsResponseData and wrap it as a successful OCSPResponse."""
    k = p.signer_key
    if isinstance(k, ec.EllipticCurvePrivateKey):
        sig = k.sign(tbs, ec.ECDSA(sig_hash(k)))
    else:
        sig = k.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(certs, _Default):
        certs = [p.issuer.signer.cert_der] if p.delegated else None
    body = tbs + p.issuer.signer.sig_alg + der.tlv(0x03, b"\x00" + sig)
    if certs is not None:
        body += der.tlv(0xA0, der.tlv(0x30, b"".join(certs)))
    basic = der.tlv(0x30, body)
    return der.tlv(0x30, bytes.fromhex("0a0100") + der.tlv(0xA0, der.tlv(0x30, BASIC_OID + der.tlv(0x04, basic))))


def rebuild(buf: bytes, fn: Callable[[bytes], bytes | None]) -> bytes:
    """Re-encode a DER tree, replacing each element for which fn returns bytes."""
    tag, cs, ce = der.read_tlv(buf)
    whole = buf[:ce]
    new = fn(whole)
    if new is not None:
        return new
    if not tag & 0x20:
        return whole
    parts, pos = [], cs
    while pos < ce:
        _, _, end = der.read_tlv(buf, pos)
        parts.append(rebuild(buf[pos:end], fn))
        pos = end
    return der.tlv(tag, b"".join(parts))


def swap(old: bytes, new: bytes, t: bytes) -> bytes | None:
    return new if t == old else None


def tbs_of(data: bytes) -> bytes:
    return ocsp.load_der_ocsp_response(data).tbs_response_bytes


def entry(status: Status = Status.GOOD, revoked_at: dt.datetime | None = None, reason: Reason | None = None) -> LedgerEntry:
    return LedgerEntry(
        issuer="ca",
        serial=SERIAL,
        kind=Kind.PRECERTIFICATE,
        not_after=NOW + dt.timedelta(days=90),
        status=status,
        revoked_at=revoked_at,
        reason=reason,
    )


GOOD = Expectation(entry=entry(), hashes=("sha1",), validity=VALIDITY)
REVOKED = Expectation(entry=entry(Status.REVOKED, REVOKED_AT, Reason.keyCompromise), hashes=("sha1",), validity=VALIDITY)


def check(data: bytes, p: PKI, expect: Expectation | None = GOOD, now: dt.datetime | None = None) -> list[str]:
    """Findings for ``data``, checked at ``now`` (default: the clock now, not
    NOW: OCSPResponseBuilder stamps producedAt with the clock, and a session
    can reach this module more than CLOCK_SKEW after importing it)."""
    return verify_response(data, p.issuer, expect, now or dt.datetime.now(UTC))


def has(findings: list[str], prefix: str) -> bool:
    return any(f.startswith(prefix) for f in findings)


# ---- passing responses -------------------------------------------------------------------------


def test_good_response_passes(pki: PKI) -> None:
    data = build(pki)
    assert check(data, pki) == []
    assert check(data, pki, None) == []


def test_revoked_response_passes(pki: PKI) -> None:
    data = build(pki, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT, reason=x509.ReasonFlags.key_compromise)
    assert check(data, pki, REVOKED) == []


def test_revoked_without_reason_passes(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT)
    assert check(data, p256, Expectation(entry(Status.REVOKED, REVOKED_AT), ("sha1",), VALIDITY)) == []


def test_sha256_certid_and_only_br_bounds(p256d: PKI) -> None:
    data = build(p256d, alg="sha256", nxt=THIS + dt.timedelta(hours=8) - dt.timedelta(seconds=1))
    assert check(data, p256d, Expectation(entry(), ("sha256",), None)) == []
    assert check(data, p256d, Expectation(entry(), ("sha1",), None)) == [
        "certid: SingleResponse hashes (sha256), expected (sha1)"
    ]


def two_singles(p: PKI) -> bytes:
    tbs1, tbs2 = tbs_of(build(p, alg="sha1")), tbs_of(build(p, alg="sha256"))

    def responses(tbs: bytes) -> bytes:
        _, cs, ce = der.read_tlv(tbs)
        pos = cs
        while pos < ce:
            tag, _, e = der.read_tlv(tbs, pos)
            if tag == 0x30:
                return tbs[pos:e]
            pos = e
        raise AssertionError

    r1, r2 = responses(tbs1), responses(tbs2)
    _, s2, e2 = der.read_tlv(r2)
    combined = der.tlv(0x30, r1[der.read_tlv(r1)[1] :] + r2[s2:e2])
    return wrap(p, rebuild(tbs1, lambda t: combined if t == r1 else None))


def test_two_certid_hashes(p256d: PKI) -> None:
    data = two_singles(p256d)
    assert check(data, p256d, Expectation(entry(), ("sha1", "sha256"), VALIDITY)) == []
    assert check(data, p256d, Expectation(entry(), ("sha256", "sha1"), VALIDITY)) == [
        "certid: SingleResponse hashes (sha1, sha256), expected (sha256, sha1)"
    ]
    assert check(data, p256d, GOOD) == ["certid: SingleResponse hashes (sha1, sha256), expected (sha1)"]
    d = describe(data)
    assert [r["hash"] for r in d["responses"]] == ["sha1", "sha256"]


def test_describe(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT, reason=x509.ReasonFlags.superseded)
    d = describe(data)
    assert d["responseStatus"] == "successful"
    (r,) = d["responses"]
    assert r["serial"] == format(SERIAL, "040x")
    assert r["status"] == "revoked"
    assert r["thisUpdate"] == THIS.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert r["revocation"] == {"time": REVOKED_AT.strftime("%Y-%m-%dT%H:%M:%SZ"), "reason": "superseded"}
    assert describe(UNAUTHORIZED) == {"responseStatus": "unauthorized"}
    assert describe(b"")["responseStatus"] == "malformed"


# ---- defects -----------------------------------------------------------------------------------


def test_flipped_signature_bit(pki: PKI) -> None:
    data = bytearray(build(pki))
    sig = ocsp.load_der_ocsp_response(bytes(data)).signature
    i = bytes(data).index(sig) + len(sig) // 2
    data[i] ^= 0x01
    assert check(bytes(data), pki) == ["signature: invalid"]


def test_wrong_signature_hash(tmp_path: Path) -> None:
    p = make_pki(tmp_path, "ec-p256")
    f = check(build(p, sign_with=hashes.SHA384()), p)
    assert f == ["signature: algorithm ecdsa-with-SHA384, signer requires ecdsa-with-SHA256 (BR 7.1.3.2)"]


def test_wrong_serial(p256: PKI) -> None:
    f = check(build(p256, serial=SERIAL + 1), p256)
    assert f == [f"certid: serial {SERIAL + 1:040x}, expected {SERIAL:040x}"]


def test_wrong_issuer_key_hash(p256: PKI) -> None:
    assert check(build(p256, key_hash=b"\x01" * 20), p256) == ["certid: issuerKeyHash (sha1) does not match issuer"]


def test_good_but_ledger_revoked(p256: PKI) -> None:
    assert check(build(p256), p256, REVOKED) == ["status: good, ledger says revoked"]


def test_revoked_but_ledger_good(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT)
    assert check(data, p256) == ["status: revoked, ledger says good"]


def test_wrong_reason_and_time(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT, reason=x509.ReasonFlags.superseded)
    assert check(data, p256, REVOKED) == ["status: reason superseded, ledger says keyCompromise"]
    data = build(
        p256,
        status=ocsp.OCSPCertStatus.REVOKED,
        revoked_at=REVOKED_AT - dt.timedelta(seconds=1),
        reason=x509.ReasonFlags.key_compromise,
    )
    assert has(check(data, p256, REVOKED), "status: revocationTime")


def test_explicit_unspecified_reason(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT, reason=x509.ReasonFlags.unspecified)
    expect = Expectation(entry(Status.REVOKED, REVOKED_AT), ("sha1",), VALIDITY)
    assert check(data, p256, expect) == ["status: explicit reason unspecified(0); omit it (BR 7.3.2)"]


def test_certificate_hold(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=REVOKED_AT, reason=x509.ReasonFlags.certificate_hold)
    assert has(check(data, p256, None), "status: reason certificateHold")


def test_unknown_status(p256: PKI) -> None:
    data = build(p256, status=ocsp.OCSPCertStatus.UNKNOWN)
    assert check(data, p256) == ["status: unknown (forbidden for an assigned serial, BR 4.9.9)"]
    assert check(data, p256, None) == ["status: unknown (forbidden for an assigned serial, BR 4.9.9)"]


def test_by_name_responder(p256d: PKI) -> None:
    assert check(build(p256d, by_name=True), p256d) == ["responderID: byName; byKey required (RFC 9919 §3.2.2)"]


def test_responder_key_hash_of_another_key(tmp_path: Path) -> None:
    p = make_pki(tmp_path, "ec-p256", delegated=True)
    # byKey names the CA while the delegate signs (Mozilla bug 1588001 class)
    tbs = tbs_of(build(p))
    old = bytes.fromhex("a2160414") + p.issuer.signer.key_hash
    other = bytes.fromhex("a2160414") + p.issuer.key_hash["sha1"]
    assert tbs.count(old) == 1
    f = check(wrap(p, tbs.replace(old, other)), p)
    assert len(f) == 1 and f[0].startswith("responderID: key hash ")


def test_missing_certs_when_delegated(p256d: PKI) -> None:
    assert check(build(p256d, certs=None), p256d) == ["certs: missing the delegated responder certificate (RFC 5019 §2.2.2)"]


def test_certs_present_when_ca_signs(p256: PKI) -> None:
    assert check(build(p256, certs=[p256.ca_cert]), p256) == ["certs: present though the CA signs (RFC 5019 §2.2.2)"]


def test_wrong_cert_when_delegated(p256d: PKI) -> None:
    assert check(build(p256d, certs=[p256d.ca_cert]), p256d) == ["certs: not exactly the delegated responder certificate"]


def test_empty_certs(p256: PKI) -> None:
    data = wrap(p256, tbs_of(build(p256)), certs=[])
    assert "certs: empty certs (a0 02 30 00)" in check(data, p256)


def test_nonce(p256: PKI) -> None:
    f = check(build(p256, nonce=True), p256)
    assert f == ["extensions: responseExtensions present (nonce); none allowed (RFC 9919 §3.2.1)"]


def test_empty_response_extensions(p256: PKI) -> None:
    tbs = tbs_of(build(p256))
    _, cs, ce = der.read_tlv(tbs)
    data = wrap(p256, der.tlv(0x30, tbs[cs:ce] + bytes.fromhex("a1023000")))
    assert check(data, p256) == ["extensions: empty responseExtensions (a1 02 30 00)"]


def test_version_present(p256: PKI) -> None:
    tbs = tbs_of(build(p256))
    _, cs, ce = der.read_tlv(tbs)
    f = check(wrap(p256, der.tlv(0x30, bytes.fromhex("a003020100") + tbs[cs:ce])), p256)
    assert has(f, "encoding: ResponseData.version present")  # cryptography also rejects it: malformed


def test_single_extensions(p256: PKI) -> None:
    tbs = tbs_of(build(p256))
    reason_code = bytes.fromhex("a10e300c 300a 0603551d15 0403 0a0101")

    def add_ext(t: bytes) -> bytes | None:
        tag, cs, ce = der.read_tlv(t)
        if tag == 0x30 and t[cs : cs + 1] == b"\x30" and t[der.read_tlv(t, cs)[2] :][:1] == b"\x80":
            return der.tlv(0x30, t[cs:ce] + reason_code)  # SingleResponse: certID then good
        return None

    data = wrap(p256, rebuild(tbs, add_ext))
    assert check(data, p256) == ["extensions: singleExtensions present (RFC 9919 §3.2.1, BR 7.3.2)"]


def test_this_update_in_future(p256: PKI) -> None:
    this = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(minutes=10)  # the clock, like check()
    f = check(build(p256, this=this, nxt=this + VALIDITY), p256)
    assert f"times: thisUpdate {this:%Y-%m-%dT%H:%M:%SZ} is in the future" in f
    assert has(f, f"times: thisUpdate {this:%Y-%m-%dT%H:%M:%SZ} is after producedAt")


def test_produced_at_in_future(p256: PKI) -> None:
    data = build(p256)
    produced = ocsp.load_der_ocsp_response(data).produced_at_utc  # the builder stamps the real clock
    assert check(data, p256, now=produced - dt.timedelta(minutes=4)) == []  # producedAt within CLOCK_SKEW
    f = check(data, p256, now=THIS - dt.timedelta(minutes=6))
    assert has(f, "times: producedAt") and has(f, "times: thisUpdate")


def test_revocation_time_after_produced_at(p256: PKI) -> None:
    """A ledger revocation in the future (a local time written as Z) agrees
    with the ledger, and still must not be published (RFC 6960 §4.2.1)."""
    later = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(hours=3)
    data = build(p256, status=ocsp.OCSPCertStatus.REVOKED, revoked_at=later, reason=x509.ReasonFlags.key_compromise)
    produced = ocsp.load_der_ocsp_response(data).produced_at_utc
    expect = Expectation(entry(Status.REVOKED, later, Reason.keyCompromise), ("sha1",), VALIDITY)
    assert check(data, p256, expect) == [f"times: revocationTime {later:%Y-%m-%dT%H:%M:%SZ} is after producedAt "
                                         f"{produced:%Y-%m-%dT%H:%M:%SZ}; a revocation cannot lie in the future "
                                         "(RFC 6960 §4.2.1)"]


def test_next_update_past_signer_not_after(tmp_path: Path) -> None:
    p = make_pki(tmp_path, "ec-p256", delegated=True, responder_days=2)
    f = check(build(p), p)
    assert len(f) == 1 and f[0].startswith("times: nextUpdate ") and "signer's notAfter" in f[0]


def test_interval_over_ten_days(p256: PKI) -> None:
    nxt = THIS + dt.timedelta(days=10)  # inclusive interval 10 d + 1 s
    f = check(build(p256, nxt=nxt), p256, Expectation(entry(), ("sha1",), None))
    assert f == ["times: validity interval 10 days, 0:00:01 (inclusive) outside [8h, 10d] (BR 4.9.9)"]
    f = check(build(p256, nxt=nxt - dt.timedelta(seconds=1)), p256, Expectation(entry(), ("sha1",), None))
    assert f == []


def test_interval_under_eight_hours_and_config_mismatch(p256: PKI) -> None:
    nxt = THIS + dt.timedelta(hours=8) - dt.timedelta(seconds=2)
    f = check(build(p256, nxt=nxt), p256)
    assert has(f, "times: validity interval") and has(f, "times: nextUpdate - thisUpdate is")


def test_expired(p256: PKI) -> None:
    this = NOW - dt.timedelta(days=8)
    f = check(build(p256, this=this, nxt=this + VALIDITY), p256)
    assert len(f) == 1 and f[0].startswith("times: expired")


def test_next_update_absent(p256: PKI) -> None:
    assert check(build(p256, nxt=None), p256) == ["times: nextUpdate absent (RFC 5019 §2.2.4)"]


def test_signer_not_yet_valid_at_this_update(p256: PKI) -> None:
    this = NOW - dt.timedelta(days=31)  # certs start NOW - 30 d
    f = check(build(p256, this=this, nxt=this + VALIDITY), p256, now=this + dt.timedelta(days=1))
    assert has(f, "times: thisUpdate") and "signer's notBefore" in " ".join(f)


def test_fractional_seconds(pki: PKI) -> None:
    tbs = tbs_of(build(pki))
    old = b"\x18\x0f" + THIS.strftime("%Y%m%d%H%M%SZ").encode()
    new = der.tlv(0x18, THIS.strftime("%Y%m%d%H%M%S").encode() + b".5Z")
    assert tbs.count(old) == 1
    data = wrap(pki, rebuild(tbs, lambda t: new if t == old else None))
    f = check(data, pki)
    assert f and all(x.startswith(("times: GeneralizedTime", "malformed:")) for x in f), f
    assert has(f, "times: GeneralizedTime '" + THIS.strftime("%Y%m%d%H%M%S") + ".5Z'")


def test_raw_time_scan_catches_what_a_lenient_decoder_accepts(p256: PKI) -> None:
    """cryptography 50 rejects fractional seconds itself; the raw scan must
    still flag them should a decoder accept them (Mozilla bug 1999850)."""
    tbs = tbs_of(build(p256))
    old = b"\x18\x0f" + THIS.strftime("%Y%m%d%H%M%SZ").encode()
    for frac in (b".5Z", b".123456Z", b"", b"+0000"):
        new = der.tlv(0x18, THIS.strftime("%Y%m%d%H%M%S").encode() + frac)
        f = verifier._tbs_findings(rebuild(tbs, functools.partial(swap, old, new)))
        assert len(f) == 1 and f[0].startswith("times: GeneralizedTime"), f
    assert verifier._tbs_findings(tbs) == []


def test_hand_wrapped_matches_builder(pki: PKI) -> None:
    assert check(wrap(pki, tbs_of(build(pki))), pki) == []


def test_wrong_issuer(tmp_path: Path) -> None:
    p = make_pki(tmp_path, "ec-p256")
    other = make_pki(tmp_path, "ec-p384")
    f = check(build(p), other)
    assert "signature: algorithm ecdsa-with-SHA256, signer requires ecdsa-with-SHA384 (BR 7.1.3.2)" in f
    assert "certid: issuerKeyHash (sha1) does not match issuer" in f


# ---- bytes that are not a successful response ---------------------------------------------------


@pytest.mark.parametrize("x", [1, 2, 3, 5, 6])
def test_error_responses(p256: PKI, x: int) -> None:
    name = {1: "malformedRequest", 2: "internalError", 3: "tryLater", 5: "sigRequired", 6: "unauthorized"}[x]
    assert check(bytes([0x30, 0x03, 0x0A, 0x01, x]), p256) == [f"status: {name}"]


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x30", b"\x30\x03\x0a\x01\x00", b"\x30\x03\x0a\x01\x04", b"\xff" * 64])
def test_garbage(p256: PKI, data: bytes) -> None:
    f = check(data, p256)
    assert len(f) == 1 and f[0].startswith("malformed: ")


def test_truncated(p256d: PKI) -> None:
    data = build(p256d)
    for n in (len(data) - 1, len(data) // 2, 10):
        f = check(data[:n], p256d)
        assert len(f) == 1 and f[0].startswith("malformed: "), (n, f)
    f = check(data + b"\x00", p256d)
    assert f and f[0].startswith("malformed: ")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_never_raise(p256: PKI, data: bytes) -> None:
    f = check(data, p256)
    assert f and isinstance(f, list) and all(isinstance(x, str) for x in f)
    assert isinstance(describe(data), dict)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), cut=st.booleans())
def test_mutated_response_never_raises_nor_passes(p256d: PKI, pos: int, value: int, cut: bool) -> None:
    good = _cached_response(p256d)
    pos %= len(good)
    if cut:
        data = good[:pos]
    else:
        if good[pos] == value:
            return
        data = good[:pos] + bytes([value]) + good[pos + 1 :]
    f = check(data, p256d)
    assert f, (pos, value, cut)
    assert isinstance(describe(data), dict)


_RESPONSES: dict[int, bytes] = {}


def _cached_response(p: PKI) -> bytes:
    k = id(p)
    if k not in _RESPONSES:
        _RESPONSES.clear()
        _RESPONSES[k] = build(p)
    return _RESPONSES[k]
