"""Reader for a folder of certificates and precertificates, plus CRLs.

Files: every ``.pem .crt .cer .der`` file below ``source.path`` (recursive,
symlinked folders not followed), read in sorted path order. PEM files may
hold several CERTIFICATE blocks (other block types are ignored); anything
else is read as one DER certificate. A configured issuer's own certificate
found in the folder is skipped (it is not a serial that issuer assigned).

Issuer: each certificate is matched to the configured issuer whose subject
equals its issuer Name (DER) and whose key verifies its signature
(``verify_directly_issued_by``); no match is an error row naming the file.
A precertificate signed by a Precertificate Signing Certificate
(RFC 6962 §3.1) does not match and is reported, not guessed.

Kind and dedup (RFC 6962 §3.1): a precertificate (critical CT poison) and
its final certificate share issuer + serial and give ONE entry, CERTIFICATE
when a final certificate exists, PRECERTIFICATE otherwise. The same bytes
found twice are one certificate. Two different final certificates, two
different precertificates, or a precertificate and final certificate with
different notAfter under one issuer + serial give one error row for that
serial naming every file, and no entry.

Status: GOOD unless a CRL of ``source.crls`` (PEM or DER) lists the serial;
then REVOKED with the entry's revocationDate and CRLReason (unspecified or
absent → None; certificateHold / removeFromCRL → error row, BR 4.9.13).
Each CRL must be signed by a configured issuer, else the whole source is
unusable (raised). Two CRLs disagreeing on one serial, or a CRL entry whose
certificate is not in the folder, are error rows.

Order: error rows for files as they are met, then entries in the order of
the first file (sorted) holding each serial, then CRL-only serials.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity
from ocspmint.ledger import (
    cert_kind,
    cert_serial,
    checked_reason,
    load_certificate_bytes,
    name_text,
    openssl_hex,
    split_certificates,
)
from ocspmint.model import Kind, LedgerEntry, LedgerError, Reason, Status, check_serial

SUFFIXES = (".pem", ".crt", ".cer", ".der")
_SHA256 = hashes.SHA256()


@dataclass
class _Revocation:
    revoked_at: dt.datetime
    reason: Reason | None
    crl: str
    error: str = ""


@dataclass
class _Group:
    """All certificates seen for one (issuer, serial)."""

    final: dict[bytes, tuple[str, dt.datetime]] = field(default_factory=dict)  # sha256 → (where, notAfter)
    pre: dict[bytes, tuple[str, dt.datetime]] = field(default_factory=dict)


def read_certdir(source: Source, issuers: Mapping[str, IssuerIdentity]) -> Iterator[LedgerEntry | LedgerError]:
    """Stream entries for a certificate folder (see module docstring).

    Raises LedgerError when the folder is missing or a CRL is unreadable,
    unparsable, a delta CRL or not signed by any configured issuer.
    """
    if not os.path.isdir(source.path):
        raise LedgerError(source.path, "certificate folder does not exist")
    by_name: dict[bytes, list[IssuerIdentity]] = {}
    own = set()
    for ident in issuers.values():
        by_name.setdefault(ident.cert.subject.public_bytes(), []).append(ident)
        own.add(ident.cert.fingerprint(_SHA256))
    revoked = load_crls(source.crls, by_name)
    groups: dict[tuple[str, int], _Group] = {}
    paths, walk_errors = _files(source.path)
    yield from walk_errors
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            yield LedgerError(path, f"cannot read: {e.strerror}")
            continue
        for where, item in _certificates(path, data):
            if isinstance(item, str):
                yield LedgerError(where, item)
                continue
            try:
                digest = item.fingerprint(_SHA256)
                if digest in own:
                    continue
                _add(groups, item, digest, where, by_name)
            except LedgerError as e:
                yield e
            except Exception as e:  # never crash on one file
                yield LedgerError(where, f"cannot read certificate: {type(e).__name__}: {e}")
    for (issuer, serial), group in groups.items():
        yield _entry(issuer, serial, group, revoked.pop((issuer, serial), None))
    for (issuer, serial), rev in revoked.items():
        yield LedgerError(
            rev.crl,
            f"revokes serial {openssl_hex(serial)} of issuer {issuer!r} but no certificate "
            f"with that serial is in {source.path}",
        )


def _files(root: str) -> tuple[list[str], list[LedgerError]]:
    """Sorted certificate file paths below ``root`` and an error per folder
    that could not be listed (never skipped silently)."""
    out: list[str] = []
    errors: list[LedgerError] = []

    def failed(e: OSError) -> None:
        errors.append(LedgerError(str(e.filename), f"cannot list folder: {e.strerror}"))

    for dirpath, _dirs, files in os.walk(root, onerror=failed):
        out.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(SUFFIXES))
    return sorted(out), errors


def _certificates(path: str, data: bytes) -> list[tuple[str, x509.Certificate | str]]:
    if b"-----BEGIN" in data:
        blocks = split_certificates(data)
        if not blocks:
            return [(path, "PEM file without a CERTIFICATE block")]
        if len(blocks) == 1:
            return [(path, blocks[0][1])]
        return [(f"{path}:{line}", item) for line, item in blocks]
    try:
        return [(path, load_certificate_bytes(data))]
    except ValueError as e:
        return [(path, str(e))]


def _match(cert: x509.Certificate, where: str, by_name: dict[bytes, list[IssuerIdentity]]) -> IssuerIdentity:
    candidates = by_name.get(cert.issuer.public_bytes(), [])
    if not candidates:
        raise LedgerError(where, f"issuer {name_text(cert.issuer)!r} is not a configured issuer")
    if len(candidates) > 1:  # same name (re-keyed CA): try the AKI match first, still verify
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        except Exception:
            aki = None
        candidates = sorted(candidates, key=lambda i: _ski(i.cert) != aki)
    for ident in candidates:
        try:
            cert.verify_directly_issued_by(ident.cert)
            return ident
        except Exception:
            continue
    names = ", ".join(repr(i.name) for i in candidates)
    raise LedgerError(where, f"signature does not verify with configured issuer {names} ({name_text(cert.issuer)!r})")


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except Exception:
        return None


def _add(
    groups: dict[tuple[str, int], _Group],
    cert: x509.Certificate,
    digest: bytes,
    where: str,
    by_name: dict[bytes, list[IssuerIdentity]],
) -> None:
    ident = _match(cert, where, by_name)
    serial = check_serial(cert_serial(cert), where)
    try:
        kind = cert_kind(cert)
    except ValueError as e:
        raise LedgerError(where, str(e)) from None
    group = groups.setdefault((ident.name, serial), _Group())
    bucket = group.pre if kind is Kind.PRECERTIFICATE else group.final
    bucket.setdefault(digest, (where, cert.not_valid_after_utc))


def _entry(issuer: str, serial: int, group: _Group, rev: _Revocation | None) -> LedgerEntry | LedgerError:
    members = [*group.final.values(), *group.pre.values()]
    where = members[0][0]
    problem = ""
    if len(group.final) > 1:
        problem = "different certificates share"
    elif len(group.pre) > 1:
        problem = "different precertificates share"
    elif len({not_after for _, not_after in members}) > 1:
        problem = "precertificate and certificate disagree on notAfter for"
    if problem:
        files = ", ".join(f"{w} (notAfter {na:%Y-%m-%dT%H:%M:%SZ})" for w, na in members)
        return LedgerError(where, f"{problem} serial {openssl_hex(serial)} of issuer {issuer!r}: {files}")
    if rev is not None and rev.error:
        return LedgerError(where, f"serial {openssl_hex(serial)}: {rev.error}")
    return LedgerEntry(
        issuer=issuer,
        serial=serial,
        kind=Kind.CERTIFICATE if group.final else Kind.PRECERTIFICATE,
        not_after=members[0][1],
        status=Status.REVOKED if rev else Status.GOOD,
        revoked_at=rev.revoked_at if rev else None,
        reason=rev.reason if rev else None,
        source=where,
    )


def load_crls(paths: list[str], by_name: dict[bytes, list[IssuerIdentity]]) -> dict[tuple[str, int], _Revocation]:
    """(issuer name, serial) → revocation for every entry of every CRL.

    Raises LedgerError naming the CRL file when it is unreadable, not a CRL,
    a delta CRL, or not signed by a configured issuer (RFC 5280 §6.3.3).
    Per-entry problems are kept in ``_Revocation.error``.
    """
    out: dict[tuple[str, int], _Revocation] = {}
    for path in paths:
        crl, ident = _load_crl(path, by_name)
        try:
            entries = [(entry.serial_number, _revocation(entry, path)) for entry in crl]
        except Exception as e:
            raise LedgerError(path, f"CRL entries do not parse ({e})") from None
        for serial, rev in entries:
            key = (ident.name, serial)
            prev = out.get(key)
            if prev is not None and (prev.revoked_at, prev.reason, prev.error) != (rev.revoked_at, rev.reason, rev.error):
                rev.error = rev.error or f"CRLs {prev.crl} and {path} disagree on its revocation"
            out[key] = rev
    return out


def _load_crl(path: str, by_name: dict[bytes, list[IssuerIdentity]]) -> tuple[x509.CertificateRevocationList, IssuerIdentity]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise LedgerError(path, f"cannot read CRL: {e.strerror}") from None
    try:
        pem = b"-----BEGIN X509 CRL-----" in data
        crl = x509.load_pem_x509_crl(data) if pem else x509.load_der_x509_crl(data)
    except ValueError as e:
        raise LedgerError(path, f"not a CRL ({e})") from None
    try:
        delta = any(isinstance(e.value, x509.DeltaCRLIndicator) for e in crl.extensions)
    except Exception as e:
        raise LedgerError(path, f"CRL extensions do not parse ({e})") from None
    if delta:
        raise LedgerError(path, "delta CRLs are not supported (RFC 5280 §5.2.4)")
    for ident in by_name.get(crl.issuer.public_bytes(), []):
        try:
            if crl.is_signature_valid(ident.cert.public_key()):  # type: ignore[arg-type]
                return crl, ident
        except Exception:
            continue
    raise LedgerError(path, f"CRL issued by {name_text(crl.issuer)!r} is not signed by any configured issuer")


def _revocation(entry: x509.RevokedCertificate, crl: str) -> _Revocation:
    when = entry.revocation_date_utc
    rev = _Revocation(revoked_at=when.replace(microsecond=0), reason=None, crl=crl)
    if when.microsecond:
        rev.error = f"revocationDate in {crl} has fractional seconds (RFC 5280 §4.1.2.5.2)"
        return rev
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return rev
    except Exception as e:
        rev.error = f"CRL entry extensions in {crl} do not parse ({e})"
        return rev
    try:
        rev.reason = checked_reason(Reason[flag.value])
    except ValueError as e:
        rev.error = f"{e} in {crl}"
    return rev
