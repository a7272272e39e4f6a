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

Each entry's ``not_before`` is its certificate's notBefore. A row whose
notAfter has passed needs no certificate file (CAs prune them; nothing is
signed for it): without one it is an entry of kind certificate.

Lines parse one at a time: ``parse_line`` checks the fields (no file
access), ``IndexRows.entry`` adds the duplicate check and the certificate
file; ``read_index`` streams the whole file through them and ``IndexTail``
(``ledger.tail``) only the lines that changed since its last look.

Error rows (yielded, ``path:line``): wrong field count, unknown status
letter, bad expiry/revocation time, a revocation time in the future,
R without or V/E with a revocation, refused/unknown reason, bad or
out-of-range serial, duplicate serial (second occurrence), missing/
unreadable/unparsable certificate file, serial/issuer/notAfter
disagreement, non-critical poison. An error row whose serial field parses
names the serial (``LedgerError.key``), however bad the rest of it, and
counts for the duplicate check: that serial is then published from no
line (a refused revocation must not leave a later good line in force).
Raised: index unreadable, certs_dir not a folder, issuer not configured.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity
from ocspmint.ledger import (cert_kind, cert_serial, checked_reason, load_certificate_bytes, name_text, openssl_hex,
                            psc_signed_final)
from ocspmint.ledger.tail import Change, file_time
from ocspmint.model import UTC, Kind, LedgerEntry, LedgerError, Reason, RowRemoved, Status, check_serial, future_revocation, utc_now

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


class _Signer(NamedTuple):
    """A key that may sign the certificates of an index: the issuer's, or
    one of its Precertificate Signing Certificates (``psc`` its file)."""

    cert: x509.Certificate
    subject_der: bytes
    ski: bytes
    psc: str | None

    def named(self, issuer: str) -> str:
        return f"issuer {issuer!r}" if self.psc is None else \
            f"Precertificate Signing Certificate {self.psc} of issuer {issuer!r}"


def _signer(cert: x509.Certificate, psc: str | None) -> _Signer:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return _Signer(cert, cert.subject.public_bytes(), ski, psc)


class _IssuerCheck:
    """Name + AKI match against one issuer (signature only without an
    AKI), or against one of its Precertificate Signing Certificates
    (``[[issuers]] precert_signing_certificates``, RFC 6962 §3.1), which
    sign precertificates only (BR 7.1.2.4)."""

    def __init__(self, ident: IssuerIdentity) -> None:
        self.ident = ident
        self.signers = [_signer(ident.cert, None), *(_signer(p.cert, p.path) for p in ident.precert_signers)]

    def problem(self, cert: x509.Certificate) -> str | None:
        """None when ``cert`` is the issuer's, else what is wrong."""
        name = cert.issuer.public_bytes()
        signers = [s for s in self.signers if s.subject_der == name]
        if not signers:
            also = " nor by one of its Precertificate Signing Certificates" if len(self.signers) > 1 else ""
            return (f"is issued by {name_text(cert.issuer)!r}, not by issuer {self.ident.name!r} "
                    f"({name_text(self.ident.cert.subject)!r}){also}")
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        except x509.ExtensionNotFound:
            aki = None
        problems = []
        for signer in signers:
            if (problem := self._unsigned(cert, signer, aki)) is not None:
                problems.append(problem)
            elif signer.psc is not None and not _precertificate(cert):
                return psc_signed_final(signer.psc, self.ident.name)
            else:
                return None
        return "; ".join(problems)

    def _unsigned(self, cert: x509.Certificate, signer: _Signer, aki: bytes | None) -> str | None:
        """Why ``signer`` did not sign ``cert`` (its AKI, else its
        signature), None when it did."""
        if aki is not None:
            if aki != signer.ski:
                return f"has authorityKeyIdentifier {aki.hex()} but {signer.named(self.ident.name)} has key id {signer.ski.hex()}"
            return None
        try:
            cert.verify_directly_issued_by(signer.cert)
        except Exception as e:
            return f"signature does not verify with {signer.named(self.ident.name)} ({type(e).__name__} {e})".rstrip()
        return None


def _precertificate(cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries the CT poison (a malformed one counts:
    ``_check_certificate``'s ``cert_kind`` reports it)."""
    try:
        return cert_kind(cert) is Kind.PRECERTIFICATE
    except ValueError:
        return True


class Row(NamedTuple):
    """The fields of one index line that need no certificate file."""

    letter: str  # V | R | E
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    reason: Reason | None
    serial: int
    serial_text: str  # as written in the index


def parse_line(line: bytes, where: str) -> Row:
    """One index line (without its line end) → Row.

    Raises LedgerError naming ``where`` for a wrong field count, unknown
    status letter, bad time or revocation, or a bad serial. Neither the
    certificate file nor duplicates are checked (``IndexRows.entry`` does).
    """
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
    return Row(letter, not_after, revoked_at, reason, serial, serial_text)


def serial_field(line: bytes) -> tuple[int, str] | None:
    """(serial, its text) of a line whose serial field parses, whatever the
    rest of the line holds; None when it does not."""
    fields = line.split(b"\t")
    if len(fields) != FIELDS or not _HEX.fullmatch(text := fields[3].decode("ascii", "replace")):
        return None
    try:
        return check_serial(int(text, 16), ""), text
    except LedgerError:
        return None


def first_lines(lines: Sequence[bytes]) -> dict[int, int]:
    """serial → 1-based number of the first line holding it, over every line
    whose serial field parses (``serial_field``; lines without their ``\\n``)."""
    seen: dict[int, int] = {}
    for lineno, raw in enumerate(lines, 1):
        if found := serial_field(raw.rstrip(b"\r")):
            seen.setdefault(found[0], lineno)
    return seen


class IndexRows:
    """Turns single lines of one ``openssl-index`` source into entries."""

    def __init__(self, source: Source, issuers: Mapping[str, IssuerIdentity]) -> None:
        """Raises LedgerError when ``source.issuer`` is not in ``issuers`` or
        ``certs_dir`` is not a folder."""
        if source.issuer not in issuers:
            raise LedgerError(source.path, f"issuer {source.issuer!r} is not configured")
        if not os.path.isdir(source.certs_dir):
            raise LedgerError(source.path, f"certificate folder {source.certs_dir!r} does not exist")
        self.source = source
        self.check = _IssuerCheck(issuers[source.issuer])

    def entry(self, line: bytes, lineno: int, seen: dict[int, int]) -> LedgerEntry | LedgerError:
        """Line ``lineno`` (1-based, without its line end) → its entry, or a
        LedgerError naming ``path:lineno``; never raises.

        ``seen`` maps serial → first line number holding it; the line's serial
        is added when absent, and a serial first held by another line makes
        this line a duplicate. Reads the line's certificate file. An error
        names the serial (``key``) whenever the serial field parses.
        """
        where = f"{self.source.path}:{lineno}"
        found = serial_field(line)
        key = None if found is None else (self.source.issuer, found[0])
        first = lineno if found is None else seen.setdefault(found[0], lineno)
        try:
            row = parse_line(line, where)  # parses only if ``found``
            if first != lineno:
                raise LedgerError(where, f"duplicate serial {row.serial_text} (first on line {first})")
            if row.revoked_at is not None and (problem := future_revocation("revocation date", row.revoked_at)):
                raise LedgerError(where, problem)
            kind, not_before = _check_certificate(row, where, self.source.certs_dir, self.check)
            return LedgerEntry(
                issuer=self.source.issuer,
                serial=row.serial,
                kind=kind,
                not_after=row.not_after,
                status=Status.REVOKED if row.letter == "R" else Status.GOOD,
                revoked_at=row.revoked_at,
                reason=row.reason,
                source=where,
                not_before=not_before,
            )
        except LedgerError as e:
            return LedgerError(e.source, e.message, key)
        except Exception as e:  # never crash on one row
            return LedgerError(where, f"cannot read row: {type(e).__name__}: {e}", key)


def read_index(source: Source, issuers: Mapping[str, IssuerIdentity]) -> Iterator[LedgerEntry | LedgerError]:
    """Stream the rows of an ``openssl ca`` index.txt (see module docstring).

    Raises LedgerError when the index cannot be read, ``certs_dir`` is not a
    folder or ``source.issuer`` is not in ``issuers``.
    """
    rows = IndexRows(source, issuers)
    try:
        fh = open(source.path, "rb")
    except OSError as e:
        raise LedgerError(source.path, f"cannot read index: {e.strerror}") from None
    seen: dict[int, int] = {}
    blank: list[int] = []
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.rstrip(b"\n").rstrip(b"\r")
            if not line:
                blank.append(lineno)  # an error only if a row follows
                continue
            for b in blank:
                yield LedgerError(f"{source.path}:{b}", "empty line inside the index")
            blank.clear()
            yield rows.entry(line, lineno, seen)


def _check_certificate(row: Row, where: str, certs_dir: str, check: _IssuerCheck) -> tuple[Kind, dt.datetime | None]:
    """The row's certificate file cross-checked → (kind, its notBefore);
    (certificate, None) for an expired row without one (module docstring)."""
    serial, serial_text, not_after = row.serial, row.serial_text, row.not_after
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
        if not_after <= utc_now():
            return Kind.CERTIFICATE, None
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
        return cert_kind(cert), cert.not_valid_before_utc
    except ValueError as e:
        raise LedgerError(where, f"certificate file {file}: {e}") from None


@dataclass
class _Position:
    """What IndexTail remembers of the index as last read."""

    key: tuple[int, int, int]  # (st_ino, st_size, st_mtime_ns)
    digests: array[int]  # hash() of each complete line, in line order
    last_row: int  # 1-based number of the last non-empty line, 0 if none
    seen: dict[int, int]  # serial → first line holding it (duplicate detection)


class IndexTail:
    """Incremental reader of one index.txt (contract: ``ledger.tail.Tail``).

    Unchanged (st_ino, st_size, st_mtime_ns) → nothing read. Otherwise the
    whole file is read and each complete line's 8-byte hash (``hash()``:
    SipHash, keyed per process) compared with the one at the same line
    number last time (``openssl ca`` rewrites
    the file keeping line order: revocation and ``-updatedb`` change lines in
    place, issuance appends); only changed and new lines are parsed and
    their certificate files read. An empty line is reported once a row
    follows it. A line without its final newline is still being written and
    is left for a later call. Memory: 8 bytes per line plus the serial →
    first line map (~115 bytes per serial). When lines were removed or an
    in-place change altered a line's serial, the map is rebuilt from every
    line's fields (no certificate read), and each serial no line holds any
    more is an error row naming it (``removed``), first in the call.
    """

    def __init__(self, source: Source, issuers: Mapping[str, IssuerIdentity]) -> None:
        self._source = source
        self._issuers = issuers
        self._pos: _Position | None = None

    def start(self) -> None:
        """Remember the index as it is now. Raises LedgerError like read_index."""
        IndexRows(self._source, self._issuers)
        key, _, lines = _snapshot(self._source.path)
        self._pos = _Position(key, array("q", map(hash, lines)), _last_row(lines), first_lines(lines))

    def changes(self) -> Iterator[Change]:
        """Entries (or errors) of changed and new lines since the last call,
        in line order, after an error row for each serial that no line
        holds any more (``removed``), each with the index's mtime as
        ``seen_at``."""
        pos = self._pos
        assert pos is not None, "start() first"
        path = self._source.path
        try:
            if _stat_key(os.stat(path)) == pos.key:
                return
        except OSError as e:
            raise LedgerError(path, f"cannot read index: {e.strerror}") from None
        rows = IndexRows(self._source, self._issuers)
        key, mtime, lines = _snapshot(path)
        digests = array("q", map(hash, lines))
        changed = [i for i, (a, b) in enumerate(zip(pos.digests, digests)) if a != b]
        in_place = len(changed)
        changed += range(len(pos.digests), len(lines))
        seen = pos.seen
        if len(lines) < len(pos.digests) or not all(_same_serial(lines[i], i + 1, seen) for i in changed[:in_place]):
            seen = first_lines(lines)
            for serial in sorted(pos.seen.keys() - seen.keys()):
                yield Change(removed(path, self._source.issuer, serial), mtime)
        last_row = _last_row(lines)
        # rows appended after trailing empty lines make those lines errors
        for i in sorted({*changed, *range(pos.last_row, last_row)}):
            line = lines[i].rstrip(b"\r")
            if line:
                yield Change(rows.entry(line, i + 1, seen), mtime)
            elif i + 1 < last_row:
                yield Change(LedgerError(f"{path}:{i + 1}", "empty line inside the index"), mtime)
        self._pos = _Position(key, digests, last_row, seen)


def removed(path: str, issuer: str, serial: int) -> RowRemoved:
    """The error row of a serial no line of the index holds any more,
    naming it (``key``), like a row deleted from a SQLite ledger
    (``RowRemoved``): its state is unknown, so it leaves the
    routine schedule (``pipeline.forgetting_unknown``)."""
    return RowRemoved(path, f"serial {openssl_hex(serial)} is no longer in the index (its line was removed, or now "
                             "holds another serial): its response is no longer re-signed and is served until its "
                             "nextUpdate; a CA does not delete what it issued: restore the line, or remove the "
                             "response with `ocspmint audit --fix`", (issuer, serial))


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _snapshot(path: str) -> tuple[tuple[int, int, int], dt.datetime, list[bytes]]:
    """(stat key, mtime as whole-second UTC, complete lines without ``\\n``).
    The key is taken before reading, so a write during the read is seen
    again next time. Raises LedgerError when the file cannot be read."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except OSError as e:
        raise LedgerError(path, f"cannot read index: {e.strerror}") from None
    complete = data[: data.rfind(b"\n") + 1]
    return _stat_key(st), file_time(st.st_mtime_ns), complete.split(b"\n")[:-1]


def _last_row(lines: Sequence[bytes]) -> int:
    return next((n for n in range(len(lines), 0, -1) if lines[n - 1].rstrip(b"\r")), 0)


def _same_serial(raw: bytes, lineno: int, seen: dict[int, int]) -> bool:
    """Whether line ``lineno`` still holds the serial ``seen`` has for it."""
    found = serial_field(raw.rstrip(b"\r"))
    return found is not None and seen.get(found[0]) == lineno
