"""The few DER pieces the response encoder needs (X.690 §8, §10).

Only definite-length, single-byte-tag forms are produced or read.
"""

from __future__ import annotations

import datetime as dt


def header(tag: int, n: int) -> bytes:
    """``tag`` + the DER length octets of ``n`` content bytes: the short
    form below 128, else 0x80 | the count of length octets, then the length
    big-endian (X.690 §8.1.3, §10.1)."""
    if n < 0x80:
        return bytes((tag, n))
    count = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | count)) + n.to_bytes(count, "big")


def tlv(tag: int, content: bytes) -> bytes:
    """``header(tag, len(content))`` + ``content``."""
    return header(tag, len(content)) + content


def integer(value: int) -> bytes:
    """DER INTEGER for a non-negative int (leading 00 when the high bit is set)."""
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return tlv(0x02, body)


def generalized_time(t: dt.datetime) -> bytes:
    """GeneralizedTime ``YYYYMMDDHHMMSSZ`` (RFC 5280 §4.1.2.5.2).

    Raises ValueError for a naive datetime, a non-UTC offset or fractional
    seconds: those are the IdenTrust and fractional-seconds incident classes.
    """
    if t.tzinfo is None or t.utcoffset() != dt.timedelta(0):
        raise ValueError(f"time {t!r} is not timezone-aware UTC")
    if t.microsecond:
        raise ValueError(f"time {t.isoformat()} has fractional seconds")
    return b"\x18\x0f" + t.strftime("%Y%m%d%H%M%SZ").encode("ascii")


def read_tlv(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    """Parse the TLV at ``pos``: return (tag, content start, content end).

    Raises ValueError on truncation or a length form DER forbids.
    """
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first < 0x80:
        n = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(buf):
            raise ValueError("bad DER length")
        n = int.from_bytes(buf[pos : pos + count], "big")
        if n < 0x80 or buf[pos] == 0:
            raise ValueError("non-minimal DER length")
        pos += count
    if pos + n > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, pos + n


def spki_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING value (without the unused-bits octet)
    of a SubjectPublicKeyInfo; this is what CertID and byKey hash (RFC 6960
    §4.1.1, §4.2.1)."""
    _, start, _ = read_tlv(spki)
    _, _, alg_end = read_tlv(spki, start)
    tag, bits_start, bits_end = read_tlv(spki, alg_end)
    if tag != 0x03 or spki[bits_start] != 0:
        raise ValueError("SubjectPublicKeyInfo has no octet-aligned BIT STRING")
    return spki[bits_start + 1 : bits_end]
