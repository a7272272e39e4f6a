"""Reader for a folder of certificates and precertificates, plus CRLs.

Files: every ``.pem .crt .cer .der`` file below ``source.path`` (recursive),
read in sorted path order. Symlinked files are read; a symlinked folder is
not followed and is an error row naming it (its certificates would
otherwise be missing without a word: give its target as a source of its
own). A folder entry that cannot be examined (a symlink loop, no
permission) is an error row naming that entry; the rest of its folder is
still read. PEM files may hold several CERTIFICATE blocks (other block
types are ignored); anything else is read as one DER certificate. A
configured issuer's own certificate found in the folder is skipped (it is
not a serial that issuer assigned).

Issuer: each certificate is matched to the configured issuer whose subject
equals its issuer Name (DER) and whose key verifies its signature
(``verify_directly_issued_by``), or to a configured
Precertificate Signing Certificate (``[[issuers]]
precert_signing_certificates``, RFC 6962 §3.1, BR 7.1.2.4) matched the
same way: its precertificate is an entry of the issuer that issued that
certificate (RFC 6962 §3.1: that CA issues the final certificate with the
same serial; the CertID is the CA's). A certificate without the CT poison
signed by a Precertificate Signing Certificate is an error row naming the
file (such a CA signs only precertificates, BR 7.1.2.4). No match is an
error row naming the file: a precertificate whose Precertificate Signing
Certificate is not configured is reported, not guessed.

Kind and dedup (RFC 6962 §3.1): a precertificate (critical CT poison) and
its final certificate share issuer + serial (the issuer of a
precertificate a Precertificate Signing Certificate signed is that
certificate's issuer) and give ONE entry, CERTIFICATE
when a final certificate exists, PRECERTIFICATE otherwise. The same bytes
found twice are one certificate. Two different final certificates, two
different precertificates, or a precertificate and final certificate with
different notBefore or notAfter under one issuer + serial give one error row
for that serial naming every file, and no entry. ``not_before``/``not_after``
are the certificates' own. A revocation error row (a refused CRL entry, a
CRL revoking a serial the folder lacks) names its serial
(``LedgerError.key``): that serial is assigned but its state unknown, so
no other source's word on it is published (``pipeline.checked_entries``;
BR 4.9.13: a certificate on hold must not be answered ``good``) and
``audit --fix`` never deletes its response as unassigned.

Status: GOOD unless a CRL of ``source.crls`` (PEM or DER) lists the serial;
then REVOKED with the entry's revocationDate and CRLReason (unspecified or
absent → None; certificateHold / removeFromCRL → error row, BR 4.9.13).
Each CRL must be signed by a configured issuer and current, else the whole
source is unusable (raised). Current (RFC 5280 §6.3.3 (a)): its nextUpdate
has not passed (aware UTC now, whole seconds). A CRL past its nextUpdate may
miss later revocations, and every serial it does not list would be
answered ``good``; a CRL without nextUpdate cannot be judged current at all
(RFC 5280 §5.1.2.5 and BR 7.2 require the field) and is refused the same
way. Publish each CRL before the previous one's nextUpdate. Two CRLs
disagreeing on one serial, or a CRL entry whose certificate is not in the
folder, are error rows.

Order: error rows for files as they are met, then entries in the order of
the first file (sorted) holding each serial, then CRL-only serials.

``CertdirTail`` (``ledger.tail``) reads only new files and changed CRLs; an
unchanged CRL whose nextUpdate passes makes its next ``changes()`` raise.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ocspmint.config import Source
from ocspmint.issuer import IssuerIdentity, PrecertSigner
from ocspmint.ledger import (
    cert_kind,
    cert_serial,
    checked_reason,
    load_certificate_bytes,
    name_text,
    openssl_hex,
    psc_signed_final,
    split_certificates,
)
from ocspmint.ledger.tail import Change, file_time
from ocspmint.model import Kind, LedgerEntry, LedgerError, Reason, RowRemoved, Status, check_serial, utc_now

SUFFIXES = (".pem", ".crt", ".cer", ".der")
_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class _CrlTime:
    """When a loaded CRL stops being current."""

    path: str
    next_update: dt.datetime  # aware UTC


def _check_current(path: str, next_update: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """``next_update`` when CRL ``path`` is current at ``now`` (RFC 5280
    §6.3.3 (a)), else LedgerError naming it: after its nextUpdate a CRL may
    miss revocations."""
    if next_update is None:
        raise LedgerError(path, "CRL has no nextUpdate, so whether it is current cannot be told "
                                "(RFC 5280 §5.1.2.5, BR 7.2 require it)")
    if now > next_update:
        raise LedgerError(path, f"CRL is not current: its nextUpdate {next_update:%Y-%m-%dT%H:%M:%SZ} has passed "
                                f"(now {now:%Y-%m-%dT%H:%M:%SZ}); it may miss later revocations (RFC 5280 §6.3.3), "
                                "publish a fresh CRL")
    return next_update


@dataclass
class _Revocation:
    revoked_at: dt.datetime
    reason: Reason | None
    crl: str
    error: str = ""


Key = tuple[str, int]  # (issuer name, serial)
Signed = tuple[PrecertSigner, IssuerIdentity]  # a Precertificate Signing Certificate and the issuer it stands for
_Member = tuple[str, dt.datetime, dt.datetime]  # (where, notBefore, notAfter)


@dataclass
class _Group:
    """All certificates seen for one (issuer, serial)."""

    final: dict[bytes, _Member] = field(default_factory=dict)  # sha256 → member
    pre: dict[bytes, _Member] = field(default_factory=dict)


class _Certificates:
    """The certificates read so far from one folder, grouped by Key."""

    def __init__(self, issuers: Mapping[str, IssuerIdentity]) -> None:
        self.by_name: dict[bytes, list[IssuerIdentity]] = {}
        self.precert_signers: dict[bytes, list[Signed]] = {}  # by subject DER
        self.own: set[bytes] = set()  # the issuers' own certificates (SHA-256), skipped
        for ident in issuers.values():
            self.by_name.setdefault(ident.cert.subject.public_bytes(), []).append(ident)
            self.own.add(ident.cert.fingerprint(_SHA256))
            for psc in ident.precert_signers:
                self.precert_signers.setdefault(psc.cert.subject.public_bytes(), []).append((psc, ident))
        self.groups: dict[Key, _Group] = {}

    def add(self, path: str, data: bytes) -> tuple[list[LedgerError], list[Key]]:
        """Group every certificate of file ``path`` (content ``data``) →
        (error rows in file order, the Keys it holds)."""
        errors: list[LedgerError] = []
        keys: list[Key] = []
        for where, item in _certificates(path, data):
            if isinstance(item, str):
                errors.append(LedgerError(where, item))
                continue
            try:
                digest = item.fingerprint(_SHA256)
                if digest not in self.own:
                    keys.append(self._add(item, digest, where))
            except LedgerError as e:
                errors.append(e)
            except Exception as e:  # never crash on one file
                errors.append(LedgerError(where, f"cannot read certificate: {type(e).__name__}: {e}"))
        return errors, keys

    def _add(self, cert: x509.Certificate, digest: bytes, where: str) -> Key:
        """Put ``cert`` (SHA-256 ``digest``, read at ``where``) in its
        group → its Key. Raises LedgerError naming ``where`` when no
        configured issuer or Precertificate Signing Certificate signed it,
        a Precertificate Signing Certificate signed a certificate without
        the CT poison, or the serial or extensions are bad."""
        ident, psc = _match(cert, where, self.by_name, self.precert_signers)
        serial = check_serial(cert_serial(cert), where)
        try:
            kind = cert_kind(cert)
        except ValueError as e:
            raise LedgerError(where, str(e)) from None
        if psc is not None and kind is not Kind.PRECERTIFICATE:
            raise LedgerError(where, f"certificate serial {openssl_hex(serial)} {psc_signed_final(psc.path, ident.name)}")
        group = self.groups.setdefault((ident.name, serial), _Group())
        bucket = group.pre if kind is Kind.PRECERTIFICATE else group.final
        bucket.setdefault(digest, (where, cert.not_valid_before_utc, cert.not_valid_after_utc))
        return ident.name, serial


def read_certdir(source: Source, issuers: Mapping[str, IssuerIdentity]) -> Iterator[LedgerEntry | LedgerError]:
    """Stream entries for a certificate folder (see module docstring).

    Raises LedgerError when the folder is missing or a CRL is unreadable,
    unparsable, a delta CRL, not signed by any configured issuer, or not
    current (past its nextUpdate, or without one).
    """
    if not os.path.isdir(source.path):
        raise LedgerError(source.path, "certificate folder does not exist")
    certs = _Certificates(issuers)
    revoked, _ = load_crls(source.crls, certs.by_name, utc_now())
    files, _, walk_errors = _walk(source.path)
    yield from walk_errors
    for path in sorted(files):
        try:
            data, _ = _read(path)
        except OSError as e:
            yield LedgerError(path, f"cannot read: {e.strerror}")
            continue
        yield from certs.add(path, data)[0]
    for key, group in certs.groups.items():
        yield _entry(key, group, revoked.pop(key, None))
    for key, rev in revoked.items():
        yield _orphan(key, rev, source.path)


def _orphan(key: Key, rev: _Revocation, folder: str) -> LedgerError:
    issuer, serial = key
    return LedgerError(
        rev.crl, f"revokes serial {openssl_hex(serial)} of issuer {issuer!r} but no certificate with that serial is in {folder}",
        key,
    )


def _valid(group: _Group, now: dt.datetime) -> bool:
    """Whether a certificate of ``group`` is unexpired at ``now``."""
    return any(not_after > now for _, _, not_after in [*group.final.values(), *group.pre.values()])


def _removed(key: Key, folder: str) -> RowRemoved:
    """The error row of an unexpired serial whose every certificate left
    the folder, naming it (``key``), like a row deleted from a SQLite
    ledger (``RowRemoved``): its state is unknown, so it
    leaves the routine schedule (``pipeline.forgetting_unknown``)."""
    issuer, serial = key
    return RowRemoved(folder, f"no certificate of serial {openssl_hex(serial)} of issuer {issuer!r} is in the folder "
                               "any more (its files were removed, replaced or are unreadable): its response is no "
                               "longer re-signed and is served until its nextUpdate; a CA does not delete what it "
                               "issued: put the certificate back, or remove the response with `ocspmint audit --fix`",
                       key)


def _read(path: str) -> tuple[bytes, int]:
    """(content, st_mtime_ns) of a file; OSError when it cannot be read."""
    with open(path, "rb") as fh:
        return fh.read(), os.fstat(fh.fileno()).st_mtime_ns


def _walk(root: str) -> tuple[dict[str, int], dict[str, int], list[LedgerError]]:
    """Every certificate file below ``root`` (path → inode), every folder
    listed (path → st_mtime_ns, taken before its listing) and an error per
    folder that could not be listed, per symlinked folder (not followed)
    and per entry that could not be examined: none is skipped silently, and
    one bad entry does not end its folder's listing. One ``stat`` per
    folder, none per file (but per symlink)."""
    files: dict[str, int] = {}
    folders: dict[str, int] = {}
    errors: list[LedgerError] = []
    todo = [root]
    while todo:
        folder = todo.pop()
        try:
            folders[folder] = os.stat(folder).st_mtime_ns
            with os.scandir(folder) as listing:
                for item in listing:
                    try:
                        is_dir = item.is_dir()
                    except OSError as e:  # a symlink loop, a target without permission
                        errors.append(LedgerError(item.path, f"cannot tell whether it is a folder or a file: {e.strerror}"))
                        continue
                    if is_dir and item.is_symlink():
                        errors.append(LedgerError(item.path, "symlinked folder, not followed: its certificates are not "
                                                             "read (give its target as a certdir source of its own)"))
                    elif is_dir:
                        todo.append(item.path)
                    elif item.name.lower().endswith(SUFFIXES):
                        files[item.path] = item.inode()
        except OSError as e:
            errors.append(LedgerError(str(e.filename or folder), f"cannot list folder: {e.strerror}"))
    return files, folders, errors


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


def _match(
    cert: x509.Certificate, where: str, by_name: dict[bytes, list[IssuerIdentity]], signers: dict[bytes, list[Signed]]
) -> tuple[IssuerIdentity, PrecertSigner | None]:
    """The issuer of ``cert`` (read at ``where``), and the Precertificate
    Signing Certificate that signed it on that issuer's behalf (None: the
    issuer itself did): the one whose subject is ``cert``'s issuer Name and
    whose key verifies its signature. Raises LedgerError naming ``where``
    when none does."""
    name = cert.issuer.public_bytes()
    candidates = [(None, ident) for ident in by_name.get(name, [])] + signers.get(name, [])
    if not candidates:
        raise LedgerError(where, f"issuer {name_text(cert.issuer)!r} is not a configured issuer or Precertificate "
                                 "Signing Certificate")
    if len(candidates) > 1:  # same name (re-keyed CA): try the AKI match first, still verify
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        except Exception:
            aki = None
        candidates = sorted(candidates, key=lambda c: _ski((c[0] or c[1]).cert) != aki)
    for psc, ident in candidates:
        try:
            cert.verify_directly_issued_by((psc or ident).cert)
            return ident, psc
        except Exception:
            continue
    names = ", ".join(f"configured issuer {ident.name!r}" if psc is None
                      else f"Precertificate Signing Certificate {psc.path} of issuer {ident.name!r}"
                      for psc, ident in candidates)
    raise LedgerError(where, f"signature does not verify with {names} ({name_text(cert.issuer)!r})")


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except Exception:
        return None


def _entry(key: Key, group: _Group, rev: _Revocation | None) -> LedgerEntry | LedgerError:
    issuer, serial = key
    members = [*group.final.values(), *group.pre.values()]
    where, not_before, not_after = members[0]
    problem = ""
    if len(group.final) > 1:
        problem = "different certificates share"
    elif len(group.pre) > 1:
        problem = "different precertificates share"
    elif len({(nb, na) for _, nb, na in members}) > 1:
        problem = "precertificate and certificate disagree on notBefore/notAfter for"
    if problem:
        files = ", ".join(f"{w} (notBefore {nb:%Y-%m-%dT%H:%M:%SZ}, notAfter {na:%Y-%m-%dT%H:%M:%SZ})" for w, nb, na in members)
        return LedgerError(where, f"{problem} serial {openssl_hex(serial)} of issuer {issuer!r}: {files}", key)
    if rev is not None and rev.error:
        return LedgerError(where, f"serial {openssl_hex(serial)}: {rev.error}", key)
    return LedgerEntry(
        issuer=issuer,
        serial=serial,
        kind=Kind.CERTIFICATE if group.final else Kind.PRECERTIFICATE,
        not_after=not_after,
        status=Status.REVOKED if rev else Status.GOOD,
        revoked_at=rev.revoked_at if rev else None,
        reason=rev.reason if rev else None,
        source=where,
        not_before=not_before,
    )


def load_crls(
    paths: list[str], by_name: dict[bytes, list[IssuerIdentity]], now: dt.datetime
) -> tuple[dict[Key, _Revocation], list[_CrlTime]]:
    """(issuer name, serial) → revocation for every entry of every CRL, and
    each CRL's nextUpdate.

    Raises LedgerError naming the CRL file when it is unreadable, not a CRL,
    a delta CRL, not signed by a configured issuer, or not current at
    ``now`` (aware UTC): past its nextUpdate or without one (RFC 5280 §6.3.3).
    Per-entry problems are kept in ``_Revocation.error``.
    """
    out: dict[Key, _Revocation] = {}
    times: list[_CrlTime] = []
    for path in paths:
        crl, ident = _load_crl(path, by_name)
        times.append(_CrlTime(path, _check_current(path, crl.next_update_utc, now)))
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
    return out, times


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


@dataclass
class _Position:
    """What CertdirTail remembers of the folder and CRLs as last read."""

    certs: _Certificates  # every certificate read, grouped
    folders: dict[str, int]  # folder → st_mtime_ns
    files: dict[str, int]  # certificate file read → inode
    crls: list[tuple[int, int, int]]  # (st_ino, st_size, st_mtime_ns) per source.crls
    revoked: dict[Key, _Revocation]
    walk_errors: set[str]
    crl_times: list[_CrlTime] = field(default_factory=list)  # nextUpdate of each CRL as last read


class CertdirTail:
    """Incremental reader of one certificate folder (contract: ``ledger.tail.Tail``).

    Unchanged folder mtimes (every folder of the tree) and CRL (inode, size,
    mtime) → nothing read. A changed folder → a listing of the whole tree
    (one stat per folder, none per file) and reading only the files that are
    new; a changed CRL → all CRLs re-read. Yields the entries of the
    (issuer, serial) pairs the new files hold or whose revocation changed,
    computed from every certificate seen for the pair (precertificate and
    final certificate pairing, conflicts: as ``read_certdir``), and the error
    rows of new files and new listing failures. A removed or replaced file
    (other inode) makes the call re-read every file, so its certificates no
    longer count, and yields the pairs whose certificates changed; a pair
    left without any certificate while one was unexpired is an error row
    naming its serial (``_removed``; expired ones may be pruned). A file
    rewritten in place (same inode) is not noticed: write a new file and
    rename it. ``start()`` reads every certificate, as ``read_certdir`` does;
    the groups stay in memory (~1 KB per certificate). A CRL that is not
    re-read is still checked against the clock on every call: once its
    nextUpdate passes, ``changes()`` raises (no I/O) until a fresh CRL is
    written, which is then read as any changed CRL.
    """

    def __init__(self, source: Source, issuers: Mapping[str, IssuerIdentity]) -> None:
        self._source = source
        self._issuers = issuers
        self._pos: _Position | None = None

    def start(self) -> None:
        """Read the folder and CRLs as they are now. Raises LedgerError like
        read_certdir."""
        self._pos = _Position(_Certificates(self._issuers), {}, {}, [], {}, set())
        for _ in self.changes():
            pass

    def changes(self) -> Iterator[Change]:
        """Entries (or errors) of new files and changed revocations since the
        last call; ``seen_at`` is the mtime of the file or CRL that brought
        the change (the time of the call for a removal or a read failure)."""
        pos = self._pos
        assert pos is not None, "start() first"
        root = self._source.path
        if not os.path.isdir(root):
            raise LedgerError(root, "certificate folder does not exist")
        crls = self._crl_keys()
        now = utc_now()
        crl_times = pos.crl_times
        if crls == pos.crls:  # unchanged CRLs are not re-read, but they still go stale
            for t in crl_times:
                _check_current(t.path, t.next_update, now)
        moved = not pos.folders or any(_mtime_ns(f) != m for f, m in pos.folders.items())
        if not moved and crls == pos.crls:
            return
        touched: dict[Key, dt.datetime] = {}  # in the order met
        certs, revoked = pos.certs, pos.revoked
        if crls != pos.crls:
            revoked, crl_times = load_crls(self._source.crls, certs.by_name, now)
            crl_time = {path: file_time(key[2]) for path, key in zip(self._source.crls, crls)}
            for key in revoked.keys() | pos.revoked.keys():
                if revoked.get(key) != pos.revoked.get(key):
                    touched[key] = crl_time[(revoked.get(key) or pos.revoked[key]).crl]
        folders, files, walk_errors = pos.folders, pos.files, pos.walk_errors
        if moved:
            listing, folders, errors = _walk(root)
            walk_errors = {str(e) for e in errors}
            for e in errors:
                if str(e) not in pos.walk_errors:
                    yield Change(e, now)
            fresh = {p for p, inode in listing.items() if pos.files.get(p) != inode}
            gone = pos.files.keys() - (listing.keys() - fresh)  # removed or replaced
            if gone:
                certs = _Certificates(self._issuers)
            unreadable = set()
            for path in sorted(listing if gone else fresh):
                try:
                    data, mtime_ns = _read(path)
                except OSError as e:
                    unreadable.add(path)
                    if path in fresh:
                        yield Change(LedgerError(path, f"cannot read: {e.strerror}"), now)
                    continue
                errors, keys = certs.add(path, data)
                if path in fresh:
                    written = file_time(mtime_ns)
                    for e in errors:
                        yield Change(e, written)
                    for key in keys:
                        touched[key] = max(touched.get(key, written), written)
            if gone:
                for key in certs.groups.keys() | pos.certs.groups.keys():
                    if certs.groups.get(key) != pos.certs.groups.get(key):
                        touched.setdefault(key, now)
            files = _without(listing, unreadable)
        for key, seen_at in touched.items():
            group = certs.groups.get(key)
            if group is not None:
                yield Change(_entry(key, group, revoked.get(key)), seen_at)
            elif key in revoked:
                yield Change(_orphan(key, revoked[key], root), seen_at)
            elif (old := pos.certs.groups.get(key)) is not None and _valid(old, now):
                yield Change(_removed(key, root), seen_at)
        self._pos = _Position(certs, folders, files, crls, revoked, walk_errors, crl_times)

    def _crl_keys(self) -> list[tuple[int, int, int]]:
        """(st_ino, st_size, st_mtime_ns) of each CRL; LedgerError if one is missing."""
        out = []
        for path in self._source.crls:
            try:
                st = os.stat(path)
            except OSError as e:
                raise LedgerError(path, f"cannot read CRL: {e.strerror}") from None
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return out


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _without(files: dict[str, int], paths: set[str]) -> dict[str, int]:
    return {p: inode for p, inode in files.items() if p not in paths}
