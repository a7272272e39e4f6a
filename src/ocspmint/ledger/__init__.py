"""Ledger readers: every assigned serial of every issuer, as LedgerEntry rows.

``read_source(source, issuers)`` streams ``LedgerEntry | LedgerError`` for one
configured source (``config.Source``):

- ``openssl-index``: an ``openssl ca`` index.txt (``ledger.openssl_index``);
- ``certdir``: a folder of certificates and precertificates (``ledger.certdir``);
- ``sqlite``: the embedded ledger filled by ``ledger.sqlite.ingest``.

``ledger.tail.Tail`` reads only what changed in a source since its last look
(for a long-running service; costs per source type in docs/ledger.md).

A bad row is *yielded* as a LedgerError naming ``path:line`` (or the file, or
``db:issuer/serial``) so the caller can stop or quarantine (config
``on_error``); the good rows around it still come through. LedgerError is
*raised* only when the whole source is unusable (missing or unreadable file,
unknown issuer, unverifiable CRL). Readers never guess: anything ambiguous is
an error row, never a silently repaired entry.

Helpers shared by the readers live here: certificate loading, precertificate
detection (RFC 6962 §3.1 CT poison) and CRLReason mapping (RFC 5280 §5.3.1,
BR 4.9.13 / 7.3.2).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity
from ocspmint.model import Kind, LedgerEntry, LedgerError, Reason

__all__ = [
    "read_source", "cert_kind", "cert_serial", "checked_reason",
    "load_certificate_bytes", "split_certificates", "name_text", "openssl_hex", "psc_signed_final",
]

CT_POISON = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.3")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"


def read_source(source: Source, issuers: Mapping[str, IssuerIdentity]) -> Iterator[LedgerEntry | LedgerError]:
    """Stream the entries of one source; bad rows come as yielded LedgerErrors.

    ``issuers`` maps config issuer names to identities (``issuer.load_issuers``).
    Raises LedgerError (on first ``next()``) when the source as a whole is
    unusable, and ValueError for an unknown ``source.type``.
    """
    if source.type == "openssl-index":
        from ocspmint.ledger.openssl_index import read_index

        return read_index(source, issuers)
    if source.type == "certdir":
        from ocspmint.ledger.certdir import read_certdir

        return read_certdir(source, issuers)
    if source.type == "sqlite":
        from ocspmint.ledger.sqlite import read_ledger

        return read_ledger(source, issuers)
    raise ValueError(f"unknown ledger source type {source.type!r}")


def _load(loader: Callable[[bytes], x509.Certificate], data: bytes) -> x509.Certificate:
    # cryptography warns (and will later refuse) on serial 0 / negative; the
    # readers report those themselves through model.check_serial.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return loader(data)


def cert_serial(cert: x509.Certificate) -> int:
    """The certificate's serial as an int, without cryptography's warning
    for zero/negative serials (callers check it with model.check_serial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return cert.serial_number


def load_certificate_bytes(data: bytes) -> x509.Certificate:
    """Exactly one certificate from PEM (text before it allowed, as
    ``openssl ca`` writes) or DER bytes. Raises ValueError saying why."""
    if _BEGIN_CERT in data:
        blocks = split_certificates(data)
        if len(blocks) != 1:
            raise ValueError(f"holds {len(blocks)} certificates, expected exactly one")
        _, cert = blocks[0]
        if isinstance(cert, str):
            raise ValueError(cert)
        return cert
    if b"-----BEGIN" in data:
        raise ValueError("PEM file without a CERTIFICATE block")
    try:
        return _load(x509.load_der_x509_certificate, data)
    except ValueError as e:
        raise ValueError(f"not a DER certificate ({e})") from None


def split_certificates(data: bytes) -> list[tuple[int, x509.Certificate | str]]:
    """Every ``CERTIFICATE`` PEM block of ``data`` as (1-based line of its
    BEGIN, certificate or an error message). A BEGIN without its END is an
    error item, and the complete block after it is still read; other PEM
    block types are ignored."""
    out: list[tuple[int, x509.Certificate | str]] = []
    ends = 0
    for m in _PEM_CERT.finditer(data):
        ends = m.end()
        start = data.rfind(_BEGIN_CERT, m.start(), m.end())  # a BEGIN without END before it: the match spans both
        cut = m.start()
        while (cut := data.find(_BEGIN_CERT, cut, start)) >= 0:
            out.append((data.count(b"\n", 0, cut) + 1, "PEM CERTIFICATE block without its END line"))
            cut += len(_BEGIN_CERT)
        line = data.count(b"\n", 0, start) + 1
        try:
            out.append((line, _load(x509.load_pem_x509_certificate, data[start:m.end()])))
        except ValueError as e:
            out.append((line, f"PEM block is not a certificate ({e})"))
    start = data.find(_BEGIN_CERT, ends)
    if start >= 0:
        out.append((data.count(b"\n", 0, start) + 1, "PEM CERTIFICATE block without its END line"))
    return out


def cert_kind(cert: x509.Certificate) -> Kind:
    """PRECERTIFICATE when the CT poison extension 1.3.6.1.4.1.11129.2.4.3 is
    present (it MUST be critical, RFC 6962 §3.1), else CERTIFICATE.
    Raises ValueError for a non-critical poison or unparsable extensions."""
    try:
        ext = cert.extensions.get_extension_for_oid(CT_POISON)
    except x509.ExtensionNotFound:
        return Kind.CERTIFICATE
    except Exception as e:  # malformed or duplicate extensions
        raise ValueError(f"extensions do not parse ({e})") from None
    if not ext.critical:
        raise ValueError("CT poison extension 1.3.6.1.4.1.11129.2.4.3 is not critical (RFC 6962 §3.1)")
    return Kind.PRECERTIFICATE


def psc_signed_final(psc: str, issuer: str) -> str:
    """Why a certificate without the CT poison that Precertificate Signing
    Certificate ``psc`` (its file) of ``issuer`` signed is refused: such a
    CA signs precertificates only (RFC 6962 §3.1, BR 7.1.2.4). Shared by
    the certdir and openssl-index readers."""
    return (f"has no CT poison extension but is signed by Precertificate Signing Certificate {psc} of issuer "
            f"{issuer!r}, which signs only precertificates (RFC 6962 §3.1, BR 7.1.2.4)")


def checked_reason(reason: Reason) -> Reason | None:
    """The reason to store: unspecified → None (BR 7.3.2 omits it).

    Raises ValueError for certificateHold (BR 4.9.13 forbids suspension) and
    removeFromCRL (delta CRLs only, RFC 5280 §5.3.1; un-revocation is
    forbidden by BR 4.9.13)."""
    if reason is Reason.unspecified:
        return None
    if reason is Reason.certificateHold:
        raise ValueError("revocation reason certificateHold is forbidden (BR 4.9.13)")
    if reason is Reason.removeFromCRL:
        raise ValueError("revocation reason removeFromCRL is not a revocation (RFC 5280 §5.3.1, BR 4.9.13)")
    return reason


def openssl_hex(serial: int) -> str:
    """Uppercase hex in whole octets, as ``openssl ca`` writes serials (0A1B)."""
    text = format(serial, "X")
    return text.zfill(len(text) + len(text) % 2)


def name_text(name: x509.Name) -> str:
    """RFC 4514 text of a Name for messages, or a placeholder if it fails."""
    try:
        return name.rfc4514_string()
    except Exception:  # pragma: no cover - exotic attribute types
        return "<unprintable name>"
