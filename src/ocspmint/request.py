"""OCSP requests: a strict DER parser, a builder and the GET URL forms.

``parse_request(der)`` reads an ``OCSPRequest`` (RFC 6960 §4.1.1) into its
CertIDs; ``parse_get_path(path)`` first undoes the GET encoding of RFC 6960
Appendix A.1 (``/{url-encoded base64 of the DER}``). ``build_request`` and
``request_for`` make the requests a client sends (RFC 5019 §2.1: one Request,
no signature, no extensions), ``get_paths`` their GET paths, which caches key
on and purges name. ``IssuerMap`` maps a CertID to the configured issuer and
its store key (``store.object_key``).

Anything the parser does not accept raises ``RequestError``, which a
responder answers with ``malformedRequest`` (RFC 6960 §4.2.1). What is
accepted:

- DER only: definite, minimal lengths; no trailing bytes at any level;
  minimal INTEGER serials (a leading 00 only before a high bit), never
  negative or empty. ``version`` [0] may be present but must be v1 (0).
- CertID hashAlgorithm SHA-1 or SHA-256 with parameters NULL or absent
  (RFC 9919 §2.1, RFC 5019 §2.1.1); the two hashes must have the digest's
  length. Any other algorithm is refused.
- ``requestorName`` [1], ``requestExtensions`` [2],
  ``singleRequestExtensions`` [0] and ``optionalSignature`` [0] are checked
  for shape and ignored; so is a nonce (pre-generated responses carry none,
  RFC 5019 §2.1.1). A critical extension other than the nonce is refused:
  it cannot be honoured (RFC 5280 §4.2).
- 1 to ``MAX_REQUESTS`` Requests. RFC 5019 §2.1.1 allows one; the responder
  answers a list only when every entry names the same certificate (e.g. a
  SHA-1 and a SHA-256 CertID of one serial), never just its first entry.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import quote, unquote_to_bytes

from ocspmint import der
from ocspmint.issuer import IssuerIdentity
from ocspmint.model import MAX_SERIAL
from ocspmint.store import object_key

MAX_REQUESTS = 8
# OID contents (without tag and length) -> hash name, and digest sizes.
HASH_OIDS = {
    bytes.fromhex("2b0e03021a"): "sha1",
    bytes.fromhex("608648016503040201"): "sha256",
}
_OID_OF = {name: oid for oid, name in HASH_OIDS.items()}
DIGEST_SIZE = {"sha1": 20, "sha256": 32}
NONCE_OID = bytes.fromhex("2b0601050507300102")  # id-pkix-ocsp-nonce, RFC 8954
_NULL = b"\x05\x00"
_MAX_SLASHES = 16  # merged-"//" repair tries at most this many positions


class RequestError(ValueError):
    """The bytes or the GET path are not an acceptable OCSPRequest."""


class CertIdKey(NamedTuple):
    """One CertID of a request: ``hash_name`` "sha1" | "sha256", the
    issuerNameHash and issuerKeyHash digests, and the serial (an int ≥ 0)."""

    hash_name: str
    name_hash: bytes
    key_hash: bytes
    serial: int


def _tlv(buf: bytes, pos: int, end: int, tag: int | None = None) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at ``pos``, which must
    lie wholly before ``end`` and carry ``tag`` when one is given."""
    if pos >= end:
        raise RequestError("truncated DER")
    try:
        t, start, stop = der.read_tlv(buf, pos)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if stop > end:
        raise RequestError("DER element overruns its parent")
    if tag is not None and t != tag:
        raise RequestError(f"expected tag {tag:#04x}, got {t:#04x}")
    return t, start, stop


def _one(buf: bytes, start: int, end: int, tag: int | None = None) -> tuple[int, int, int]:
    """The single TLV that fills ``buf[start:end]`` exactly."""
    t, s, e = _tlv(buf, start, end, tag)
    if e != end:
        raise RequestError("trailing bytes")
    return t, s, e


def _extensions(buf: bytes, start: int, end: int) -> None:
    """Check an EXPLICIT-tagged ``Extensions`` (RFC 5280 §4.1): a non-empty
    SEQUENCE OF {OID, critical BOOLEAN, OCTET STRING}. Refuses a critical
    extension other than the nonce."""
    _, pos, stop = _one(buf, start, end, 0x30)
    if pos == stop:
        raise RequestError("empty Extensions")
    while pos < stop:
        _, s, e = _tlv(buf, pos, stop, 0x30)
        _, os_, oe = _tlv(buf, s, e, 0x06)
        if os_ == oe:
            raise RequestError("empty extension OID")
        p, critical = oe, False
        t, bs, be = _tlv(buf, p, e)
        if t == 0x01:
            if be - bs != 1 or buf[bs] not in (0x00, 0xFF):
                raise RequestError("bad BOOLEAN")
            critical, p = buf[bs] == 0xFF, be
        _one(buf, p, e, 0x04)
        if critical and buf[os_:oe] != NONCE_OID:
            raise RequestError("unsupported critical request extension")
        pos = e


def _serial(buf: bytes, start: int, end: int) -> int:
    if start == end:
        raise RequestError("empty INTEGER")
    if buf[start] & 0x80:
        raise RequestError("negative serial")
    if end - start > 1 and buf[start] == 0 and not buf[start + 1] & 0x80:
        raise RequestError("non-minimal INTEGER")
    return int.from_bytes(buf[start:end], "big")


def _cert_id(buf: bytes, start: int, end: int) -> CertIdKey:
    """CertID ::= SEQUENCE {hashAlgorithm, issuerNameHash, issuerKeyHash,
    serialNumber} (RFC 6960 §4.1.1); ``buf[start:end]`` is its content."""
    _, a_s, a_e = _tlv(buf, start, end, 0x30)
    _, o_s, o_e = _tlv(buf, a_s, a_e, 0x06)
    hash_name = HASH_OIDS.get(buf[o_s:o_e])
    if hash_name is None:
        raise RequestError("CertID hash algorithm is neither SHA-1 nor SHA-256")
    if o_e != a_e and buf[o_e:a_e] != _NULL:
        raise RequestError("CertID hash parameters must be NULL or absent")
    hashes = []
    pos = a_e
    for _ in range(2):
        _, s, e = _tlv(buf, pos, end, 0x04)
        if e - s != DIGEST_SIZE[hash_name]:
            raise RequestError(f"CertID hash is not a {hash_name} digest")
        hashes.append(buf[s:e])
        pos = e
    _, s, e = _one(buf, pos, end, 0x02)
    return CertIdKey(hash_name, hashes[0], hashes[1], _serial(buf, s, e))


def parse_request(data: bytes) -> list[CertIdKey]:
    """The CertIDs of a DER ``OCSPRequest`` (RFC 6960 §4.1.1), in order;
    1 to MAX_REQUESTS of them. Raises RequestError for anything else (see
    the module docstring); never raises another exception for any bytes."""
    buf = bytes(data)
    _, start, end = _one(buf, 0, len(buf), 0x30)
    _, t_s, t_e = _tlv(buf, start, end, 0x30)  # tbsRequest
    if t_e != end:  # optionalSignature [0] EXPLICIT Signature: shape only
        _, s, e = _one(buf, t_e, end, 0xA0)
        _one(buf, s, e, 0x30)
    pos = t_s
    tag, s, e = _tlv(buf, pos, t_e)
    if tag == 0xA0:  # version [0] EXPLICIT, DEFAULT v1
        _, vs, ve = _one(buf, s, e, 0x02)
        if buf[vs:ve] != b"\x00":
            raise RequestError("unsupported OCSPRequest version")
        pos = e
        tag, s, e = _tlv(buf, pos, t_e)
    if tag == 0xA1:  # requestorName [1] EXPLICIT GeneralName
        _one(buf, s, e)
        pos = e
        tag, s, e = _tlv(buf, pos, t_e)
    if tag != 0x30:
        raise RequestError("tbsRequest has no requestList")
    list_end, pos = e, s
    if list_end != t_e:  # requestExtensions [2] EXPLICIT
        _, xs, xe = _one(buf, list_end, t_e, 0xA2)
        _extensions(buf, xs, xe)
    out: list[CertIdKey] = []
    while pos < list_end:
        if len(out) == MAX_REQUESTS:
            raise RequestError(f"more than {MAX_REQUESTS} Requests")
        _, r_s, r_e = _tlv(buf, pos, list_end, 0x30)  # Request
        _, c_s, c_e = _tlv(buf, r_s, r_e, 0x30)
        out.append(_cert_id(buf, c_s, c_e))
        if c_e != r_e:  # singleRequestExtensions [0] EXPLICIT
            _, xs, xe = _one(buf, c_e, r_e, 0xA0)
            _extensions(buf, xs, xe)
        pos = r_e
    if not out:
        raise RequestError("empty requestList")
    return out


def build_request(name_hash: bytes, key_hash: bytes, serial: int, hash_name: str, null_params: bool = True) -> bytes:
    """DER OCSPRequest with one Request for this CertID, no nonce, no
    signature (RFC 5019 §2.1.1). ``null_params`` False leaves the hash
    parameters absent. Raises ValueError for an unknown ``hash_name``,
    wrong digest lengths or a negative serial."""
    if hash_name not in _OID_OF:
        raise ValueError(f"unsupported CertID hash {hash_name!r}")
    if len(name_hash) != DIGEST_SIZE[hash_name] or len(key_hash) != DIGEST_SIZE[hash_name]:
        raise ValueError(f"issuerNameHash/issuerKeyHash must be {hash_name} digests")
    if serial < 0:
        raise ValueError("serial must not be negative")
    alg = der.tlv(0x30, der.tlv(0x06, _OID_OF[hash_name]) + (_NULL if null_params else b""))
    cert_id = der.tlv(0x30, alg + der.tlv(0x04, name_hash) + der.tlv(0x04, key_hash) + der.integer(serial))
    return der.tlv(0x30, der.tlv(0x30, der.tlv(0x30, der.tlv(0x30, cert_id))))


def request_for(issuer: IssuerIdentity, serial: int, hash_name: str = "sha1") -> bytes:
    """``build_request`` for ``serial`` of ``issuer`` (NULL parameters)."""
    return build_request(issuer.name_hash[hash_name], issuer.key_hash[hash_name], serial, hash_name)


def get_paths(request: bytes) -> list[str]:
    """The GET paths (each starting with "/", to append to a responder base
    URL without its trailing slash) clients use for ``request``: standard
    base64 with ``+ / =`` raw, then fully percent-encoded (%2B %2F %3D), as
    NSS and CryptoAPI send it (RFC 6960 App. A.1). One entry when both are
    equal. Purge each of these at a URL-keyed cache."""
    b64 = base64.b64encode(request).decode("ascii")
    paths = ["/" + b64, "/" + quote(b64, safe="")]
    return paths[:1] if paths[0] == paths[1] else paths


def _b64(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional; RequestError else."""
    text = text.replace(" ", "+").replace("-", "+").replace("_", "/")  # a "+" decoded to " " by a proxy
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("GET path is not base64") from None


def parse_get_path(path: str) -> list[CertIdKey]:
    """The CertIDs of a GET request path: the raw (still percent-encoded)
    path, with or without the query string. Leading slashes are dropped
    (the base64 of a DER SEQUENCE starts with "M"), ``%XX`` and raw
    ``+ / =`` are both accepted. If a proxy merged a ``//`` of the base64
    into ``/``, the path is repaired when doubling exactly one run of ``/``
    gives a valid request. Raises RequestError."""
    raw = path.split("?", 1)[0].lstrip("/")
    try:
        text = unquote_to_bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise RequestError("GET path is not base64") from None
    text = text.lstrip("/")
    try:
        return parse_request(_b64(text))
    except RequestError as first:
        slashes = [i for i, c in enumerate(text) if c == "/" and text[i - 1] != "/"]
        found = []
        for i in slashes[:_MAX_SLASHES]:
            try:
                found.append(parse_request(_b64(text[:i] + "/" + text[i:])))
            except RequestError:
                continue
        if len(found) != 1:
            raise first from None
        return found[0]


class IssuerMap:
    """(hash name, issuerNameHash, issuerKeyHash) -> IssuerIdentity for the
    configured issuers, both SHA-1 and SHA-256 CertIDs (RFC 6960 §4.1.1)."""

    def __init__(self, issuers: Iterable[IssuerIdentity]) -> None:
        self._by_hashes: dict[tuple[str, bytes, bytes], IssuerIdentity] = {}
        for issuer in issuers:
            for h in DIGEST_SIZE:
                self._by_hashes[(h, issuer.name_hash[h], issuer.key_hash[h])] = issuer

    def issuer(self, cid: CertIdKey) -> IssuerIdentity | None:
        """The issuer ``cid`` names, or None (not one of ours)."""
        return self._by_hashes.get((cid.hash_name, cid.name_hash, cid.key_hash))

    def key(self, cid: CertIdKey) -> str | None:
        """Store key (``store.object_key``) of the response ``cid`` asks
        for; None when the issuer is not configured or the serial is not a
        positive integer of at most 20 octets (RFC 5280 §4.1.2.2)."""
        issuer = self.issuer(cid)
        if issuer is None or not 0 < cid.serial <= MAX_SERIAL:
            return None
        return object_key(issuer.id, cid.serial)
