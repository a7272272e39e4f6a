"""OCSP response encoder: a per-issuer byte template (RFC 6960 §4.2.1).

For one issuer and signer, everything in ResponseData but the serial, the
status and the three times is constant, so ``ResponseTemplate`` keeps those
bytes ready and ``tbs()`` only splices the variable parts. The output is
byte-identical to pyca cryptography's OCSPResponseBuilder for the same
inputs (tests/test_encoder.py checks this over random serials/statuses).

Profile (docs/ocsp-rules.md): v1 (absent), ResponderID byKey, no nonce, no
responseExtensions, no singleExtensions, nextUpdate always present, whole
second UTC GeneralizedTime, reason omitted when unspecified (BR 7.3.2),
``certs`` only for a delegated responder (RFC 5019 §2.2.2).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ocspmint import der
from ocspmint.issuer import CERTID_HASH_ALG, IssuerIdentity
from ocspmint.model import LedgerEntry, Reason, Status

OCSP_BASIC_OID = bytes.fromhex("06092b0601050507300101")
GOOD = b"\x80\x00"

# Unsigned error responses (RFC 6960 §4.2.1): 30 03 0a 01 0X.
MALFORMED_REQUEST = bytes.fromhex("3003 0a01 01")
UNAUTHORIZED = bytes.fromhex("3003 0a01 06")


@dataclass(frozen=True)
class Times:
    """producedAt, thisUpdate and nextUpdate of one batch (aware UTC, whole s)."""

    produced_at: dt.datetime
    this_update: dt.datetime
    next_update: dt.datetime


def cert_status(entry: LedgerEntry) -> bytes:
    """CertStatus DER: good ``80 00`` or revoked ``a1 {time, [0] reason}``.

    Raises ValueError for certificateHold (BR 4.9.13) or a revoked entry
    without a revocation time.
    """
    if entry.status is Status.GOOD:
        return GOOD
    if entry.revoked_at is None:
        raise ValueError(f"serial {entry.serial:#x}: revoked without a revocation time")
    body = der.generalized_time(entry.revoked_at)
    if entry.reason is Reason.certificateHold:
        raise ValueError(f"serial {entry.serial:#x}: certificateHold is forbidden (BR 7.3)")
    if entry.reason is not None and entry.reason is not Reason.unspecified:
        body += b"\xa0\x03\x0a\x01" + bytes((int(entry.reason),))
    return der.tlv(0xA1, body)


class ResponseTemplate:
    """The constant parts of one issuer's responses.

    ``hashes``: CertID hash names in the order their SingleResponses appear
    (one response may carry a SHA-1 and a SHA-256 SingleResponse for the
    same serial; docs/certid.md).
    """

    def __init__(self, issuer: IssuerIdentity, hashes: tuple[str, ...]) -> None:
        self.issuer = issuer
        self.hashes = hashes
        signer = issuer.signer
        self._responder_id = b"\xa2\x16\x04\x14" + signer.key_hash
        self._certid_heads = [
            CERTID_HASH_ALG[h] + der.tlv(0x04, issuer.name_hash[h]) + der.tlv(0x04, issuer.key_hash[h]) for h in hashes
        ]
        self._sig_alg = signer.sig_alg
        self._certs = der.tlv(0xA0, der.tlv(0x30, signer.cert_der)) if signer.delegated else b""

    def time_fields(self, times: Times) -> tuple[bytes, bytes]:
        """(producedAt DER, thisUpdate + [0] nextUpdate DER) for a batch."""
        produced = der.generalized_time(times.produced_at)
        tail = der.generalized_time(times.this_update) + b"\xa0\x11" + der.generalized_time(times.next_update)
        if not times.this_update <= times.produced_at:
            raise ValueError("thisUpdate must not be after producedAt (RFC 6960 §4.2.2.1)")
        return produced, tail

    def tbs(self, entry: LedgerEntry, time_fields: tuple[bytes, bytes]) -> bytes:
        """DER of ResponseData for ``entry``; ``time_fields`` from time_fields()."""
        produced, tail = time_fields
        serial = der.integer(entry.serial)
        rest = cert_status(entry) + tail
        singles = b"".join(der.tlv(0x30, der.tlv(0x30, head + serial) + rest) for head in self._certid_heads)
        return der.tlv(0x30, self._responder_id + produced + der.tlv(0x30, singles))

    def response(self, tbs: bytes, signature: bytes) -> bytes:
        """OCSPResponse DER (successful, basic) from ResponseData and the
        signature value (DER ECDSA-Sig-Value or RSA PKCS#1 v1.5 octets)."""
        basic = der.tlv(0x30, tbs + self._sig_alg + der.tlv(0x03, b"\x00" + signature) + self._certs)
        body = der.tlv(0xA0, der.tlv(0x30, OCSP_BASIC_OID + der.tlv(0x04, basic)))
        return der.tlv(0x30, b"\x0a\x01\x00" + body)


def ecdsa_signature(raw: bytes) -> bytes:
    """PKCS#11 CKM_ECDSA output r||s (equal halves) → DER ECDSA-Sig-Value
    (RFC 5480 §2.2 / X9.62). Raises ValueError for an odd length."""
    if len(raw) % 2 or not raw:
        raise ValueError(f"ECDSA signature of odd length {len(raw)}")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return der.tlv(0x30, der.integer(r) + der.integer(s))
