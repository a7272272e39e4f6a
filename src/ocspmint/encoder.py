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
from typing import TypeVar

from ocspmint import der
from ocspmint.issuer import CERTID_HASH_ALG, IssuerIdentity
from ocspmint.model import LedgerEntry, Reason, Status

OCSP_BASIC_OID = bytes.fromhex("06092b0601050507300101")
GOOD = b"\x80\x00"
FRAMES = 64  # length combinations kept per template and kind of frame

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
        self._tbs_frames: dict[tuple[bytes, bytes, int, int], tuple[bytes, ...]] = {}
        self._response_frames: dict[tuple[int, int], tuple[bytes, bytes]] = {}

    def time_fields(self, times: Times) -> tuple[bytes, bytes]:
        """(producedAt DER, thisUpdate + [0] nextUpdate DER) for a batch."""
        produced = der.generalized_time(times.produced_at)
        tail = der.generalized_time(times.this_update) + b"\xa0\x11" + der.generalized_time(times.next_update)
        if not times.this_update <= times.produced_at:
            raise ValueError("thisUpdate must not be after producedAt (RFC 6960 §4.2.2.1)")
        return produced, tail

    def tbs(self, entry: LedgerEntry, time_fields: tuple[bytes, bytes]) -> bytes:
        """DER of ResponseData for ``entry``; ``time_fields`` from time_fields().

        Around the serial, the status and the times, every byte depends only
        on their lengths: each combination's frame is built once (a run
        meets a handful) and the parts are joined in one copy."""
        produced, tail = time_fields
        serial = der.integer(entry.serial)
        status = cert_status(entry)
        key = (produced, tail, len(serial), len(status))
        frame = self._tbs_frames.get(key) or self._tbs_frame(key)
        if len(frame) == 1:  # one CertID hash
            return b"".join((frame[0], serial, status, tail))
        return b"".join(part for piece in frame for part in (piece, serial, status, tail))

    def _tbs_frame(self, key: tuple[bytes, bytes, int, int]) -> tuple[bytes, ...]:
        """Per SingleResponse, the bytes before its serial (the first one
        also carrying ResponseData's header, ResponderID, producedAt and
        the responses SEQUENCE header); each is followed by serial, status
        and ``tail``."""
        produced, tail, n_serial, n_status = key
        pieces = []
        for head in self._certid_heads:
            cert_id = der.header(0x30, len(head) + n_serial) + head
            pieces.append(der.header(0x30, len(cert_id) + n_serial + n_status + len(tail)) + cert_id)
        singles = sum(len(p) + n_serial + n_status + len(tail) for p in pieces)
        responses = der.header(0x30, singles)
        data = len(self._responder_id) + len(produced) + len(responses) + singles
        pieces[0] = der.header(0x30, data) + self._responder_id + produced + responses + pieces[0]
        return _cached(self._tbs_frames, key, tuple(pieces))

    def response(self, tbs: bytes, signature: bytes) -> bytes:
        """OCSPResponse DER (successful, basic) from ResponseData and the
        signature value (DER ECDSA-Sig-Value or RSA PKCS#1 v1.5 octets)."""
        key = (len(tbs), len(signature))
        head, middle = self._response_frames.get(key) or self._response_frame(key)
        return b"".join((head, tbs, middle, signature, self._certs))

    def _response_frame(self, key: tuple[int, int]) -> tuple[bytes, bytes]:
        """(bytes before ResponseData, bytes between it and the signature)
        for these lengths: OCSPResponse { successful, [0] { id-pkix-ocsp-basic,
        OCTET STRING { BasicOCSPResponse { tbs, algorithm, BIT STRING
        signature, certs } } } }."""
        n_tbs, n_signature = key
        middle = self._sig_alg + der.header(0x03, n_signature + 1) + b"\x00"
        basic = der.header(0x30, n_tbs + len(middle) + n_signature + len(self._certs))
        octets = der.header(0x04, len(basic) + n_tbs + len(middle) + n_signature + len(self._certs))
        inner = OCSP_BASIC_OID + octets + basic
        n_inner = len(inner) + n_tbs + len(middle) + n_signature + len(self._certs)
        body = der.header(0xA0, len(der.header(0x30, n_inner)) + n_inner) + der.header(0x30, n_inner)
        head = b"\x0a\x01\x00" + body + inner
        head = der.header(0x30, len(head) + n_tbs + len(middle) + n_signature + len(self._certs)) + head
        return _cached(self._response_frames, key, (head, middle))


_K = TypeVar("_K")
_V = TypeVar("_V")


def _cached(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """Store ``value`` under ``key`` in a frame cache (cleared past FRAMES:
    a new batch brings new times) and return it."""
    if len(cache) >= FRAMES:
        cache.clear()
    cache[key] = value
    return value


def ecdsa_signature(raw: bytes) -> bytes:
    """PKCS#11 CKM_ECDSA output r||s (equal halves) → DER ECDSA-Sig-Value
    (RFC 5480 §2.2 / X9.62). Raises ValueError for an odd length."""
    if len(raw) % 2 or not raw:
        raise ValueError(f"ECDSA signature of odd length {len(raw)}")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return der.tlv(0x30, der.integer(r) + der.integer(s))
