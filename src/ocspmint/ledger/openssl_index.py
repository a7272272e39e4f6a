"""Reader for an OpenSSL ``openssl ca`` database (``index.txt``).

Each line is a TXT_DB row of exactly 6 tab-separated fields (apps/ca.c)::

    status  expiry  revocation  serial  filename  subject
    V|R|E   YYMMDDHHMMSSZ | YYYYMMDDHHMMSSZ (RFC 5280 §4.1.2.5: YY ≥ 50 → 19YY)
            revocation: "" | time | time,reason | time,keyTime,GENTIME
                        | time,CAkeyTime,GENTIME | time,holdInstruction,OID
            serial: hex as BN_bn2hex writes it (uppercase, whole octets,
                    "AB12" for a serial file holding "00AB12"); parsed as int
            filename: "unknown" (ignored); subject: the DN (ignored)

Revocation reasons follow ``unpack_revinfo``: names are matched without
case; ``keyTime``/``CAkeyTime`` mean keyCompromise/cACompromise with a
compromise (invalidity) time, which OCSP does not carry; ``holdInstruction``
and ``certificateHold`` are refused (BR 4.9.13); ``removeFromCRL`` is refused;
``unspecified`` is stored as None (BR 7.3.2).

The certificate of each row is ``<certs_dir>/<SERIAL>.pem`` (``openssl ca``
names it by the uppercase hex of the serial's content octets, i.e. the same
string as the index). It decides the Kind (critical CT poison → precertificate,
RFC 6962 §3.1) and is cross-checked: same serial, same notAfter as the row,
issued by the configured issuer. Issuance is checked by issuer Name (DER
equality with the CA subject) plus AuthorityKeyIdentifier == the CA's
SubjectKeyIdentifier; a P-256 signature check costs ~68 µs per certificate
on this machine against ~1 µs for name + AKI, so the signature is verified
only for a certificate without an AKI keyIdentifier.

Error rows (yielded, ``path:line``): wrong field count, unknown status
letter, bad expiry/revocation time, R without or V/E with a revocation,
refused/unknown reason, bad or out-of-range serial, duplicate serial (second
occurrence), missing/unreadable/unparsable certificate file, serial/issuer/
notAfter disagreement, non-critical poison. Raised: index unreadable,
certs_dir not a folder, issuer not configured.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator, Mapping

from cryptography import x509

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity
from ocspmint.ledger import cert_kind, cert_serial, checked_reason, load_certificate_bytes, name_text, openssl_hex
from ocspmint.model import UTC, Kind, LedgerEntry, LedgerError, Reason, Status, check_serial

FIELDS = 6
_UTCTIME = re.compile(r"[0-9]{12}Z")
_GENTIME = re.compile(r"[0-9]{14}Z")
_HEX = re.compile(r"[0-9A-Fa-f]+")

# openssl ca's crl_reasons[] (matched case-insensitively, as OPENSSL_strcasecmp does).
_REASONS: dict[str, Reason] = {
    "unspecified": Reason.unspecified,
    "keycompromise": Reason.keyCompromise,
    "cacompromise": Reason.cACompromise,
    "affiliationchanged": Reason.affiliationChanged,
    "superseded": Reason.superseded,
    "cessationofoperation": Reason.cessationOfOperation,
    "certificatehold": Reason.certificateHold,
    "removefromcrl": Reason.removeFromCRL,
}
_TIMED_REASONS = {"keytime": Reason.keyCompromise, "cakeytime": Reason.cACompromise}


def parse_time(text: str) -> dt.datetime:
    """UTCTime ``YYMMDDHHMMSSZ`` or GeneralizedTime ``YYYYMMDDHHMMSSZ`` → aware
    UTC datetime (RFC 5280 §4.1.2.5.1: YY ≥ 50 → 19YY). Raises ValueError."""
    if _UTCTIME.fullmatch(text):
        yy = int(text[:2])
        year, rest = (1900 + yy if yy >= 50 else 2000 + yy), text[2:]
    elif _GENTIME.fullmatch(text):
        year, rest = int(text[:4]), text[4:]
    else:
        raise ValueError("not YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ")
    return dt.datetime(year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]), int(rest[8:10]), tzinfo=UTC)


def parse_revocation(field: str) -> tuple[dt.datetime, Reason | None]:
    """``time[,reason[,arg]]`` as ``unpack_revinfo`` reads it → (revocation
    time, reason or None). Raises ValueError with the precise problem."""
    rtime, sep, rest = field.partition(",")
    try:
        when = parse_time(rtime)
    except ValueError:
        raise ValueError(f"bad revocation date {rtime!r}") from None
    if not sep:
        return when, None
    name, comma, arg = rest.partition(",")
    key = name.lower()
    if key == "holdinstruction":
        raise ValueError(f"revocation reason holdInstruction ({arg or 'no OID'}) is certificateHold, forbidden (BR 4.9.13)")
    if key in _TIMED_REASONS:
        if not _GENTIME.fullmatch(arg):
            raise ValueError(f"revocation reason {name} needs a compromise time YYYYMMDDHHMMSSZ, got {arg!r}")
        try:
            parse_time(arg)
        except ValueError:
            raise ValueError(f"bad compromise time {arg!r} after {name}") from None
        return when, _TIMED_REASONS[key]
    if key not in _REASONS:
        raise ValueError(f"unknown revocation reason {name!r}")
    if comma:
        raise ValueError(f"unexpected text {arg!r} after revocation reason {name}")
    return when, checked_reason(_REASONS[key])


class _IssuerCheck:
    """Name + AKI match against one issuer (signature only without an AKI)."""

    def __init__(self, ident: IssuerIdentity) -> None:
        self.ident = ident
        self.subject_der = ident.cert.subject.public_bytes()
        try:
            self.ski = ident.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            self.ski = x509.SubjectKeyIdentifier.from_public_key(ident.cert.public_key()).digest

    def problem(self, cert: x509.Certificate) -> str | None:
        if cert.issuer.public_bytes() != self.subject_der:
            return (
                f"is issued by {name_text(cert.issuer)!r}, not by issuer "
                f"{self.ident.name!r} ({name_text(self.ident.cert.subject)!r})"
            )
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        except x509.ExtensionNotFound:
            aki = None
        if aki is not None:
            if aki != self.ski:
                return f"has authorityKeyIdentifier {aki.hex()} but issuer {self.ident.name!r} has key id {self.ski.hex()}"
            return None
        try:
            cert.verify_directly_issued_by(self.ident.cert)
        except Exception as e:
            return f"signature does not verify with issuer {self.ident.name!r} ({type(e).__name__} {e})".rstrip()
        return None


def read_index(source: Source, issuers: Mapping[str, IssuerIdentity]) -> Iterator[LedgerEntry | LedgerError]:
    """Stream the rows of an ``openssl ca`` index.txt (see module docstring).

    Raises LedgerError when the index cannot be read, ``certs_dir`` is not a
    folder or ``source.issuer`` is not in ``issuers``.
    """
    path = source.path
    if source.issuer not in issuers:
        raise LedgerError(path, f"issuer {source.issuer!r} is not configured")
    if not os.path.isdir(source.certs_dir):
        raise LedgerError(path, f"certificate folder {source.certs_dir!r} does not exist")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise LedgerError(path, f"cannot read index: {e.strerror}") from None
    check = _IssuerCheck(issuers[source.issuer])
    seen: dict[int, int] = {}
    blank: list[int] = []
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip(b"\n").rstrip(b"\r")
            if not line:
                blank.append(lineno)  # an error only if a row follows
                continue
            where = f"{path}:{lineno}"
            for b in blank:
                yield LedgerError(f"{path}:{b}", "empty line inside the index")
            blank.clear()
            try:
                yield _row(line, where, source, check, seen, lineno)
            except LedgerError as e:
                yield e
            except Exception as e:  # never crash on one row
                yield LedgerError(where, f"cannot read row: {type(e).__name__}: {e}")


def _row(
    line: bytes, where: str, source: Source, check: _IssuerCheck, seen: dict[int, int], lineno: int
) -> LedgerEntry:
    fields = line.split(b"\t")
    if len(fields) != FIELDS:
        raise LedgerError(where, f"expected {FIELDS} tab-separated fields, found {len(fields)}")
    try:
        letter, expiry, revocation, serial_text = (f.decode("ascii") for f in fields[:4])
    except UnicodeDecodeError:
        raise LedgerError(where, "status, expiry, revocation or serial field is not ASCII") from None
    if letter not in ("V", "R", "E"):
        raise LedgerError(where, f"unknown status letter {letter!r}")
    try:
        not_after = parse_time(expiry)
    except ValueError:
        raise LedgerError(where, f"bad expiry date {expiry!r}") from None
    revoked_at: dt.datetime | None = None
    reason: Reason | None = None
    if letter == "R":
        if not revocation:
            raise LedgerError(where, "status R without a revocation date")
        try:
            revoked_at, reason = parse_revocation(revocation)
        except ValueError as e:
            raise LedgerError(where, str(e)) from None
    elif revocation:
        raise LedgerError(where, f"status {letter} with a revocation field {revocation!r}")
    if not _HEX.fullmatch(serial_text):
        raise LedgerError(where, f"serial {serial_text!r} is not hexadecimal")
    serial = check_serial(int(serial_text, 16), where)
    first = seen.setdefault(serial, lineno)
    if first != lineno:
        raise LedgerError(where, f"duplicate serial {serial_text} (first on line {first})")
    kind = _check_certificate(serial, serial_text, not_after, where, source.certs_dir, check)
    return LedgerEntry(
        issuer=source.issuer,
        serial=serial,
        kind=kind,
        not_after=not_after,
        status=Status.REVOKED if letter == "R" else Status.GOOD,
        revoked_at=revoked_at,
        reason=reason,
        source=where,
    )


def _check_certificate(
    serial: int, serial_text: str, not_after: dt.datetime, where: str, certs_dir: str, check: _IssuerCheck
) -> Kind:
    canonical = openssl_hex(serial)
    names = [serial_text + ".pem"] + ([canonical + ".pem"] if canonical != serial_text else [])
    data = None
    for name in names:
        file = os.path.join(certs_dir, name)
        try:
            with open(file, "rb") as fh:
                data = fh.read()
            break
        except FileNotFoundError:
            continue
        except OSError as e:
            raise LedgerError(where, f"certificate file {file} is unreadable: {e.strerror}") from None
    if data is None:
        raise LedgerError(where, f"certificate file {os.path.join(certs_dir, names[0])} is missing")
    try:
        cert = load_certificate_bytes(data)
    except ValueError as e:
        raise LedgerError(where, f"certificate file {file} {e}") from None
    if (actual := cert_serial(cert)) != serial:
        raise LedgerError(where, f"certificate file {file} has serial {openssl_hex(actual)}, the row says {serial_text}")
    problem = check.problem(cert)
    if problem:
        raise LedgerError(where, f"certificate file {file} {problem}")
    if cert.not_valid_after_utc != not_after:
        raise LedgerError(
            where,
            f"expiry {not_after:%Y-%m-%dT%H:%M:%SZ} disagrees with notAfter "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} of {file}",
        )
    try:
        return cert_kind(cert)
    except ValueError as e:
        raise LedgerError(where, f"certificate file {file}: {e}") from None
