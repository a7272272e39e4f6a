"""Independent verification of signed OCSP responses before publication.

``verify_response(der, issuer, expect, now)`` returns a list of findings,
short stable strings ``"<area>: <what>"`` (areas: malformed, status,
signature, responderID, certs, extensions, encoding, certid, times); an empty
list means the response may be published. It never raises on any input
bytes. Parsing uses pyca cryptography (``load_der_ocsp_response``), not our
encoder; a few encoding rules cryptography does not enforce (absent
``version``, empty ``certs``/``responseExtensions``, ``singleExtensions``,
whole-second GeneralizedTime) are checked on the raw DER with ``ocspmint.der``.

``describe(der)`` gives a printable summary for ``ocspmint verify FILE``.

Rules are those of docs/ocsp-rules.md: RFC 6960 §4.2, RFC 5019 §2.2,
RFC 9919 §3.2, CA/B Forum BR 4.9.9, 7.1.3.2, 7.3.2.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NamedTuple

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509 import ocsp
from cryptography.x509.oid import SignatureAlgorithmOID

from ocspmint import der as _der
from ocspmint.issuer import SIG_ALG, IssuerIdentity, SignerIdentity
from ocspmint.model import LedgerEntry, Reason, Status, serial_hex

# producedAt may lie this far ahead of the verifier's clock: signer hosts and
# the verifier host are NTP-synchronised but not identical. thisUpdate gets
# no allowance (it is backdated by design, RFC 6960 §2.4 / docs).
CLOCK_SKEW = dt.timedelta(minutes=5)
# BR 4.9.9: inclusive validity interval (nextUpdate - thisUpdate + 1 s).
MIN_INTERVAL = dt.timedelta(hours=8)
MAX_INTERVAL = dt.timedelta(days=10)
_ONE_SECOND = dt.timedelta(seconds=1)

# responseType id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1), as a full OID TLV.
_BASIC_OID = bytes.fromhex("06092b0601050507300101")
_EMPTY_SEQ = b"\x30\x00"

_ERROR_NAMES = {
    ocsp.OCSPResponseStatus.MALFORMED_REQUEST: "malformedRequest",
    ocsp.OCSPResponseStatus.INTERNAL_ERROR: "internalError",
    ocsp.OCSPResponseStatus.TRY_LATER: "tryLater",
    ocsp.OCSPResponseStatus.SIG_REQUIRED: "sigRequired",
    ocsp.OCSPResponseStatus.UNAUTHORIZED: "unauthorized",
}
_STATUS_NAMES = {
    ocsp.OCSPCertStatus.GOOD: "good",
    ocsp.OCSPCertStatus.REVOKED: "revoked",
    ocsp.OCSPCertStatus.UNKNOWN: "unknown",
}
# Signature algorithms we can verify: OID -> (key type, hash).
_SIG_VERIFY: dict[x509.ObjectIdentifier, tuple[str, hashes.HashAlgorithm]] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ("ec", hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ("ec", hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ("ec", hashes.SHA512()),
    SignatureAlgorithmOID.RSA_WITH_SHA256: ("rsa", hashes.SHA256()),
    SignatureAlgorithmOID.RSA_WITH_SHA384: ("rsa", hashes.SHA384()),
    SignatureAlgorithmOID.RSA_WITH_SHA512: ("rsa", hashes.SHA512()),
}
_SIG_NAMES = {
    SIG_ALG[("ec", "sha256")]: "ecdsa-with-SHA256",
    SIG_ALG[("ec", "sha384")]: "ecdsa-with-SHA384",
    SIG_ALG[("rsa", "sha256")]: "sha256WithRSAEncryption",
}

_KEYS: dict[bytes, Any] = {}  # signer cert DER -> public key (bytes cache their hash)


class Expectation(msgspec.Struct, frozen=True):
    """What the ledger and config say the response must contain.

    ``entry``: serial, status, revoked_at, reason (None = reason omitted).
    ``hashes``: CertID hash algorithms ("sha1", "sha256"), in order, one
    SingleResponse each. ``validity``: configured nextUpdate - thisUpdate;
    None checks only the BR 4.9.9 bounds.
    """

    entry: LedgerEntry
    hashes: tuple[str, ...]
    validity: dt.timedelta | None = None


class _Raw(NamedTuple):
    """Pieces of a successful OCSPResponse located on the raw DER."""

    tbs: bytes
    sig_alg: bytes  # AlgorithmIdentifier TLV
    certs: bytes | None  # content of [0] EXPLICIT SEQUENCE OF Certificate; None = absent
    findings: list[str]  # encoding findings inside tbsResponseData


def _t(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, tlv start, content start, content end) of each TLV in buf[start:end]."""
    out = []
    pos = start
    while pos < end:
        tag, cs, ce = _der.read_tlv(buf, pos)
        if ce > end:
            raise ValueError("TLV overruns its parent")
        out.append((tag, pos, cs, ce))
        pos = ce
    return out


def _bad_times(buf: bytes, start: int, end: int, out: list[str]) -> None:
    """Append a finding for every GeneralizedTime that is not ``YYYYMMDDHHMMSSZ``
    (RFC 5280 §4.1.2.5.2), descending into constructed TLVs."""
    for tag, _, cs, ce in _children(buf, start, end):
        if tag == 0x18:
            v = buf[cs:ce]
            if len(v) != 15 or v[14] != 0x5A or not v[:14].isdigit():
                out.append(
                    f"times: GeneralizedTime {v.decode('ascii', 'replace')!r} is not YYYYMMDDHHMMSSZ (RFC 5280 §4.1.2.5.2)"
                )
        elif tag & 0x20:
            _bad_times(buf, cs, ce, out)


def _tbs_findings(tbs: bytes) -> list[str]:
    """Encoding rules on ResponseData (RFC 6960 §4.2.1) cryptography accepts."""
    out: list[str] = []
    tag, cs, ce = _der.read_tlv(tbs)
    if tag != 0x30 or ce != len(tbs):
        raise ValueError("tbsResponseData is not one SEQUENCE")
    elems = _children(tbs, cs, ce)
    i = 0
    if elems and elems[0][0] == 0xA0:
        out.append("encoding: ResponseData.version present (v1 is the DEFAULT and must be absent, RFC 6960 §4.2.1)")
        i = 1
    # responderID, producedAt, responses, [1] responseExtensions
    if len(elems) < i + 3 or elems[i + 1][0] != 0x18 or elems[i + 2][0] != 0x30:
        raise ValueError("ResponseData layout")
    for _, _, scs, sce in _children(tbs, elems[i + 2][2], elems[i + 2][3]):
        if any(t == 0xA1 for t, *_ in _children(tbs, scs, sce)[3:]):
            out.append("extensions: singleExtensions present (RFC 9919 §3.2.1, BR 7.3.2)")
            break
    for tag, _, xcs, xce in elems[i + 3 :]:
        if tag == 0xA1 and tbs[xcs:xce] == _EMPTY_SEQ:
            out.append("extensions: empty responseExtensions (a1 02 30 00)")
        elif tag == 0xA1:
            pass  # named from the parsed extensions by the caller
        else:
            raise ValueError(f"unexpected tag {tag:#04x} in ResponseData")
    _bad_times(tbs, cs, ce, out)
    return out


def _raw(data: bytes) -> _Raw:
    """Locate tbsResponseData, signatureAlgorithm and certs; raise ValueError."""
    tag, cs, ce = _der.read_tlv(data)
    if tag != 0x30 or ce != len(data):
        raise ValueError("OCSPResponse is not one SEQUENCE")
    top = _children(data, cs, ce)
    if len(top) != 2 or top[1][0] != 0xA0:
        raise ValueError("no responseBytes")
    rb = _children(data, top[1][2], top[1][3])
    if len(rb) != 1 or rb[0][0] != 0x30:
        raise ValueError("responseBytes layout")
    rtype, octets = (_children(data, rb[0][2], rb[0][3]) + [(0, 0, 0, 0)] * 2)[:2]
    if data[rtype[1] : rtype[3]] != _BASIC_OID or octets[0] != 0x04:
        raise ValueError("responseType is not id-pkix-ocsp-basic")
    basic = data[octets[2] : octets[3]]
    tag, bcs, bce = _der.read_tlv(basic)
    if tag != 0x30 or bce != len(basic):
        raise ValueError("BasicOCSPResponse is not one SEQUENCE")
    parts = _children(basic, bcs, bce)
    if len(parts) not in (3, 4) or parts[2][0] != 0x03 or (len(parts) == 4 and parts[3][0] != 0xA0):
        raise ValueError("BasicOCSPResponse layout")
    tbs = basic[parts[0][1] : parts[0][3]]
    certs = None
    if len(parts) == 4:
        seq = _children(basic, parts[3][2], parts[3][3])
        if len(seq) != 1 or seq[0][0] != 0x30:
            raise ValueError("certs layout")
        certs = basic[seq[0][2] : seq[0][3]]
    return _Raw(tbs, basic[parts[1][1] : parts[1][3]], certs, _tbs_findings(tbs))


def _load(data: bytes) -> tuple[ocsp.OCSPResponse | None, list[str]]:
    """Parse with cryptography; (response, []) or (None, findings)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, [f"malformed: expected bytes, got {type(data).__name__}"]
    data = bytes(data)
    if not data:
        return None, ["malformed: empty body"]
    try:
        resp = ocsp.load_der_ocsp_response(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is a finding
        return None, [f"malformed: {len(data)} bytes: {str(e)[:120]}"]
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return None, [f"status: {_ERROR_NAMES.get(resp.response_status, str(resp.response_status))}"]
    return resp, []


def _public_key(signer: SignerIdentity) -> Any:
    key = _KEYS.get(signer.cert_der)
    if key is None:
        key = _KEYS[signer.cert_der] = signer.cert.public_key()
    return key


def _check_signature(resp: ocsp.OCSPResponse, raw: _Raw, signer: SignerIdentity, out: list[str]) -> None:
    """BR 7.1.3.2 algorithm and the signature over tbsResponseData (RFC 6960 §4.2.1)."""
    oid = resp.signature_algorithm_oid
    name = getattr(oid, "_name", None) or oid.dotted_string
    if raw.sig_alg != signer.sig_alg:
        want = _SIG_NAMES.get(signer.sig_alg, signer.sig_alg.hex())
        got = _SIG_NAMES.get(raw.sig_alg, name)
        if got == want:
            got = f"{name} with parameters {raw.sig_alg.hex()}"
        out.append(f"signature: algorithm {got}, signer requires {want} (BR 7.1.3.2)")
    algo = _SIG_VERIFY.get(oid)
    if algo is None or algo[0] != signer.key_type:
        out.append(f"signature: cannot verify {name} with the signer's {signer.key_type} key")
        return
    try:
        if not signature_valid(signer, raw.tbs, resp.signature, algo[1]):
            out.append("signature: invalid")
    except Exception as e:  # noqa: BLE001
        out.append(f"signature: invalid ({type(e).__name__})")


def signature_valid(signer: SignerIdentity, data: bytes, signature: bytes, hash_alg: Any = None) -> bool:
    """True when ``signature`` (DER ECDSA-Sig-Value or RSA PKCS#1 v1.5
    octets) over ``data`` verifies with the signer certificate's key.
    ``hash_alg`` defaults to the signer's hash (BR 7.1.3.2). Raises only
    for a malformed signature or key (caller decides)."""
    key = _public_key(signer)
    h = hash_alg or (hashes.SHA384() if signer.hash_name == "sha384" else hashes.SHA256())
    try:
        if signer.key_type == "ec":
            key.verify(signature, data, ec.ECDSA(h))
        else:
            key.verify(signature, data, padding.PKCS1v15(), h)
    except InvalidSignature:
        return False
    return True


def _check_responder(resp: ocsp.OCSPResponse, raw: _Raw, signer: SignerIdentity, out: list[str]) -> None:
    """ResponderID byKey of the signer (RFC 9919 §3.2.2); certs (RFC 5019 §2.2.2)."""
    key_hash = resp.responder_key_hash
    if key_hash is None:
        out.append("responderID: byName; byKey required (RFC 9919 §3.2.2)")
    elif key_hash != signer.key_hash:
        out.append(f"responderID: key hash {key_hash.hex()} is not the signer's {signer.key_hash.hex()}")
    if raw.certs is None:
        if signer.delegated:
            out.append("certs: missing the delegated responder certificate (RFC 5019 §2.2.2)")
    elif not raw.certs:
        out.append("certs: empty certs (a0 02 30 00)")
    elif not signer.delegated:
        out.append("certs: present though the CA signs (RFC 5019 §2.2.2)")
    elif raw.certs != signer.cert_der:
        out.append("certs: not exactly the delegated responder certificate")


class _Single(NamedTuple):
    hash: str
    serial: int
    status: ocsp.OCSPCertStatus
    this_update: dt.datetime
    next_update: dt.datetime | None
    revoked_at: dt.datetime | None
    reason: x509.ReasonFlags | None


def _singles(resp: ocsp.OCSPResponse, issuer: IssuerIdentity, out: list[str]) -> list[_Single]:
    """CertIDs against the issuer (RFC 6960 §4.1.1); one _Single per response."""
    singles = []
    for n, s in enumerate(resp.responses):
        try:
            alg = s.hash_algorithm.name
        except Exception:  # noqa: BLE001 - unsupported hash OID
            out.append(f"certid: SingleResponse {n} has an unsupported hash algorithm")
            continue
        if alg not in issuer.name_hash:
            out.append(f"certid: hash algorithm {alg} is not sha1 or sha256")
            continue
        if s.issuer_name_hash != issuer.name_hash[alg]:
            out.append(f"certid: issuerNameHash ({alg}) does not match issuer")
        if s.issuer_key_hash != issuer.key_hash[alg]:
            out.append(f"certid: issuerKeyHash ({alg}) does not match issuer")
        singles.append(
            _Single(
                alg,
                s.serial_number,
                s.certificate_status,
                s.this_update_utc,
                s.next_update_utc,
                s.revocation_time_utc,
                s.revocation_reason,
            )
        )
    if not singles and not out:
        out.append("certid: no SingleResponse")
    return singles


def _check_status(s: _Single, entry: LedgerEntry | None, out: list[str]) -> None:
    """good/revoked against the ledger; unknown, hold, explicit unspecified
    refused (BR 4.9.9, 4.9.13, 7.3.2)."""
    got = _STATUS_NAMES[s.status]
    if s.status == ocsp.OCSPCertStatus.UNKNOWN:
        out.append("status: unknown (forbidden for an assigned serial, BR 4.9.9)")
        return
    if s.status == ocsp.OCSPCertStatus.REVOKED:
        if s.reason == x509.ReasonFlags.unspecified:
            out.append("status: explicit reason unspecified(0); omit it (BR 7.3.2)")
        elif s.reason == x509.ReasonFlags.certificate_hold:
            out.append("status: reason certificateHold is forbidden (BR 4.9.13, 7.3)")
    if entry is None:
        return
    want = "revoked" if entry.status == Status.REVOKED else "good"
    if got != want:
        out.append(f"status: {got}, ledger says {want}")
        return
    if s.status != ocsp.OCSPCertStatus.REVOKED:
        return
    if s.revoked_at != entry.revoked_at:
        ledger_t = _t(entry.revoked_at) if entry.revoked_at else "none"
        out.append(f"status: revocationTime {_t(s.revoked_at) if s.revoked_at else 'none'}, ledger says {ledger_t}")
    want_reason = None if entry.reason in (None, Reason.unspecified) else Reason(entry.reason).name
    got_reason = None if s.reason in (None, x509.ReasonFlags.unspecified) else s.reason.value
    if got_reason != want_reason:
        out.append(f"status: reason {got_reason or 'absent'}, ledger says {want_reason or 'absent'}")


def _check_times(
    s: _Single,
    produced_at: dt.datetime,
    signer: SignerIdentity,
    validity: dt.timedelta | None,
    now: dt.datetime,
    out: list[str],
) -> None:
    """RFC 6960 §2.4, RFC 5019 §2.2.4, BR 4.9.9; CLOCK_SKEW on producedAt only."""
    this, nxt = s.this_update, s.next_update
    if this > produced_at:
        out.append(f"times: thisUpdate {_t(this)} is after producedAt {_t(produced_at)}")
    if this > now:
        out.append(f"times: thisUpdate {_t(this)} is in the future")
    if produced_at > now + CLOCK_SKEW:
        out.append(f"times: producedAt {_t(produced_at)} is in the future")
    if s.revoked_at is not None and s.revoked_at > produced_at:  # a local time written as UTC, say
        out.append(f"times: revocationTime {_t(s.revoked_at)} is after producedAt {_t(produced_at)}; "
                   "a revocation cannot lie in the future (RFC 6960 §4.2.1)")
    not_before = signer.cert.not_valid_before_utc
    if this < not_before:
        out.append(f"times: thisUpdate {_t(this)} is before the signer's notBefore {_t(not_before)}")
    if nxt is None:
        out.append("times: nextUpdate absent (RFC 5019 §2.2.4)")
        return
    if nxt <= now:
        out.append(f"times: expired, nextUpdate {_t(nxt)} is not after now {_t(now)}")
    interval = nxt - this + _ONE_SECOND
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        out.append(f"times: validity interval {interval} (inclusive) outside [8h, 10d] (BR 4.9.9)")
    if validity is not None:  # the configured validity, or less where the signer certificate expires first
        expected = min(validity, signer.not_after.replace(microsecond=0) - this)
        if nxt - this != expected and nxt <= signer.not_after:  # past notAfter: reported below
            out.append(f"times: nextUpdate - thisUpdate is {nxt - this}, configured {validity}")
    if nxt > signer.not_after:
        out.append(f"times: nextUpdate {_t(nxt)} is after the signer's notAfter {_t(signer.not_after)}")


def _verify(data: bytes, issuer: IssuerIdentity, expect: Expectation | None, now: dt.datetime) -> list[str]:
    resp, out = _load(data)
    if resp is None:
        if out[0].startswith("malformed: ") and isinstance(data, bytes) and len(data) > 5:
            try:  # say why, when our raw walk can (fractional seconds, ...)
                out += _raw(bytes(data)).findings
            except (ValueError, IndexError):
                pass
        return out
    try:
        raw = _raw(bytes(data))
    except (ValueError, IndexError) as e:
        return [f"malformed: {e}"]
    if raw.tbs != resp.tbs_response_bytes:
        return ["malformed: decoders disagree on tbsResponseData"]
    signer = issuer.signer
    out += raw.findings
    _check_signature(resp, raw, signer, out)
    _check_responder(resp, raw, signer, out)
    try:
        exts = resp.extensions
    except Exception as e:  # noqa: BLE001
        out.append(f"extensions: unparsable responseExtensions ({str(e)[:80]})")
    else:
        if len(exts):
            names = ", ".join("nonce" if x.oid == x509.OCSPNonce.oid else x.oid.dotted_string for x in exts)
            out.append(f"extensions: responseExtensions present ({names}); none allowed (RFC 9919 §3.2.1)")

    singles = _singles(resp, issuer, out)
    hashes_got = tuple(s.hash for s in singles)
    if expect is not None:
        if hashes_got != tuple(expect.hashes):
            out.append(f"certid: SingleResponse hashes ({', '.join(hashes_got)}), expected ({', '.join(expect.hashes)})")
        if expect.entry.issuer != issuer.name:
            out.append(f"certid: ledger entry is for issuer {expect.entry.issuer!r}, verifying against {issuer.name!r}")
        for s in singles:
            if s.serial != expect.entry.serial:
                out.append(f"certid: serial {serial_hex(s.serial)}, expected {serial_hex(expect.entry.serial)}")
    elif len(set(hashes_got)) != len(hashes_got):
        out.append(f"certid: repeated hash algorithm ({', '.join(hashes_got)})")
    if not singles:
        return out
    first = singles[0]
    if any(s[1:] != first[1:] for s in singles[1:]):
        out.append("certid: SingleResponses disagree on serial, status or times")
    _check_status(first, expect.entry if expect else None, out)
    _check_times(first, resp.produced_at_utc, signer, expect.validity if expect else None, now, out)
    return out


def verify_response(der: bytes, issuer: IssuerIdentity, expect: Expectation | None, now: dt.datetime) -> list[str]:
    """Check one DER OCSPResponse; return findings, [] when publishable.

    ``issuer`` gives the CertID hashes and the signer (key, algorithm,
    byKey hash, delegated or not). ``expect`` None skips the ledger and
    config comparisons (serial, status, hash list, configured validity) and
    keeps every other check. ``now`` is an aware UTC datetime (ValueError
    if naive). Never raises on any ``der`` value: unparsable bytes give
    ``malformed: ...``, the 5-byte error responses ``status: <name>``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware UTC")
    try:
        return _verify(der, issuer, expect, now)
    except Exception as e:  # noqa: BLE001 - the verifier must never crash the pipeline
        return [f"malformed: verifier could not process the response ({type(e).__name__}: {str(e)[:80]})"]


# Audit class of a finding (`ocspmint audit`, docs/audit.md): the first
# matching prefix below, else the class of the finding's area.
FINDING_CLASSES = ("malformed", "unauthorized", "error_response", "unknown", "wrong_status", "bad_signature",
                   "wrong_signer", "wrong_serial", "expired", "validity_too_long", "time_format")
_PREFIX_CLASS = (
    *((f"status: {n}", "unauthorized" if n == "unauthorized" else "error_response") for n in _ERROR_NAMES.values()),
    ("status: unknown", "unknown"),
    ("signature: algorithm", "wrong_signer"),  # another key type or hash: another signer
    ("signature: cannot verify", "wrong_signer"),
    ("certs: empty", "malformed"),
    ("certid: no SingleResponse", "malformed"),
    ("times: expired", "expired"),
    ("times: validity interval", "validity_too_long"),
    ("times: nextUpdate", "validity_too_long"),  # absent (valid forever), past the signer's notAfter, not as configured
)
_AREA_CLASS = {
    "malformed": "malformed", "encoding": "malformed", "extensions": "malformed",
    "status": "wrong_status", "signature": "bad_signature", "responderID": "wrong_signer", "certs": "wrong_signer",
    "certid": "wrong_serial", "times": "time_format",
}


def finding_class(finding: str) -> str:
    """The FINDING_CLASSES member a ``verify_response`` finding belongs to.

    ``error_response``: an unsigned error other than unauthorized
    (malformedRequest, internalError, tryLater, sigRequired; RFC 6960
    §4.2.1). ``wrong_serial`` covers every CertID mismatch (serial, issuer
    hashes, hash algorithms). ``time_format`` covers GeneralizedTime form
    (RFC 5280 §4.1.2.5.2) and times out of order or in the future.
    A string that is no verifier finding gives ``malformed``.
    """
    for prefix, cls in _PREFIX_CLASS:
        if finding.startswith(prefix):
            return cls
    return _AREA_CLASS.get(finding.partition(":")[0], "malformed")


def describe(der: bytes) -> dict[str, Any]:
    """Printable summary of a response; never raises.

    Shape: ``{"responseStatus": str, "producedAt": str, "responderKeyHash":
    hex | None, "responses": [{"hash", "serial" (40 hex digits), "status",
    "thisUpdate", "nextUpdate" (str | None), "revocation": None |
    {"time", "reason" (str | None)}}]}``; for unparsable bytes
    ``{"responseStatus": "malformed", "error": str}``; for error responses
    only ``responseStatus`` (e.g. "unauthorized").
    """
    try:
        resp, findings = _load(der)
        if resp is None:
            if findings[0].startswith("status: "):
                return {"responseStatus": findings[0][8:]}
            return {"responseStatus": "malformed", "error": findings[0].removeprefix("malformed: ")}
        responses = []
        for s in resp.responses:
            try:
                alg = s.hash_algorithm.name
            except Exception:  # noqa: BLE001
                alg = "unsupported"
            revocation = None
            if s.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                t, r = s.revocation_time_utc, s.revocation_reason
                revocation = {"time": _t(t) if t else None, "reason": r.value if r else None}
            nxt = s.next_update_utc
            responses.append(
                {
                    "hash": alg,
                    "serial": serial_hex(s.serial_number) if s.serial_number >= 0 else hex(s.serial_number),
                    "status": _STATUS_NAMES[s.certificate_status],
                    "thisUpdate": _t(s.this_update_utc),
                    "nextUpdate": _t(nxt) if nxt else None,
                    "revocation": revocation,
                }
            )
        kh = resp.responder_key_hash
        return {
            "responseStatus": "successful",
            "producedAt": _t(resp.produced_at_utc),
            "responderKeyHash": kh.hex() if kh is not None else None,
            "responses": responses,
        }
    except Exception as e:  # noqa: BLE001
        return {"responseStatus": "malformed", "error": f"{type(e).__name__}: {str(e)[:80]}"}
