"""Selections of ledger entries for `ocspmint reissue` and `ocspmint audit`.

A ``Selection`` matches a LedgerEntry by issuer names, a serial list file,
a notBefore (issuance) time range and status; an empty selection matches
nothing unless ``everything`` is set, so a typo never re-signs a whole CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Collection
from pathlib import Path

import msgspec

from ocspmint.model import MAX_SERIAL, LedgerEntry, serial_hex


class SelectionError(Exception):
    """A selector is unusable; the message names the file and line."""


_HEX = re.compile(r"[0-9a-fA-F]+")


def read_serial_list(path: str) -> set[int]:
    """Serials from a UTF-8 text file (a BOM allowed): one per line, hex
    digits with an optional ``0x`` prefix and ``:`` separators (``0A:1B``
    as browsers show them); blank lines and ``#`` comments ignored.

    A serial is a positive integer of at most 20 octets (RFC 5280
    §4.1.2.2; up to 160 bits, as ``model.check_serial``). Raises
    SelectionError naming path:line for anything else (a sign, ``_``,
    spaces inside, a second ``0x``: never guessed), and naming the file
    when it holds no serial at all: an empty list would select nothing and
    the command would end "done" having done nothing."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SelectionError(f"{path}: cannot read serial list: {e}") from None
    serials: set[int] = set()
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip().replace(":", "")
        if not text:
            continue
        digits = text[2:] if text[:2].lower() == "0x" else text
        if not _HEX.fullmatch(digits):
            raise SelectionError(f"{path}:{n}: {line.strip()!r} is not a hex serial")
        serial = int(digits, 16)
        if not 0 < serial <= MAX_SERIAL:
            raise SelectionError(f"{path}:{n}: serial {line.strip()!r} is not a positive integer of at most 20 octets "
                                 "(RFC 5280 §4.1.2.2)")
        serials.add(serial)
    if not serials:
        raise SelectionError(f"{path}: the serial list holds no serial (only blank lines or comments)")
    return serials


class Selection(msgspec.Struct, frozen=True, omit_defaults=True):
    """What to select; its canonical JSON (``key()``) identifies a reissue
    job, with the serial list by its SHA-256 so a resumed job sees the
    same population. ``issued_after``/``issued_before`` bound notBefore
    (aware UTC; after inclusive, before exclusive)."""

    issuers: list[str] = []
    serial_list: str = ""
    serial_list_sha256: str = ""
    issued_after: dt.datetime | None = None
    issued_before: dt.datetime | None = None
    status: str = ""
    everything: bool = False

    def key(self) -> str:
        return msgspec.json.encode(msgspec.structs.replace(self, serial_list="")).decode()

    def empty(self) -> bool:
        return not (self.issuers or self.serial_list or self.issued_after or self.issued_before or self.status or self.everything)


class Selector:
    """A loaded Selection: ``matches(entry)``; ``no_not_before`` counts
    entries a time range could not judge (a ledger without notBefore);
    ``check_issuers`` refuses issuer names not configured; ``unlisted``
    says which listed serials the ledger pass did not find.

    Raises SelectionError for an empty selection, an unusable serial list
    (``read_serial_list``) and a time range that holds no instant
    (``issued_after`` not before ``issued_before``): each would select
    nothing, and the command would end "done"."""

    def __init__(self, selection: Selection) -> None:
        if selection.empty():
            raise SelectionError("nothing selected: give --issuer, --serials, --issued-after/--issued-before, --status or --all")
        after, before = selection.issued_after, selection.issued_before
        if after is not None and before is not None and after >= before:
            raise SelectionError(f"--issued-after {after:%Y-%m-%dT%H:%M:%SZ} is not before --issued-before "
                                 f"{before:%Y-%m-%dT%H:%M:%SZ}: the range [after, before) selects nothing")
        self.selection = selection
        self.serials = read_serial_list(selection.serial_list) if selection.serial_list else None
        self.no_not_before = 0
        self.listed_seen: set[int] = set()  # listed serials found under a selected issuer

    def check_issuers(self, configured: Collection[str]) -> None:
        """Raise SelectionError naming each ``--issuer`` not among the
        ``configured`` issuer names (a typo would select nothing)."""
        unknown = [name for name in self.selection.issuers if name not in configured]
        if unknown:
            raise SelectionError(f"--issuer {', '.join(map(repr, unknown))}: no issuer of that name in the config "
                                 f"(configured: {', '.join(sorted(configured))})")

    def unlisted(self) -> list[str]:
        """After a full ledger pass through ``matches``: a message when
        listed serials were found in no selected issuer's ledger rows (not
        in the ledger, or only in rows in error); the caller must not end
        "done" (exit 0) with one."""
        missing = sorted((self.serials or set()) - self.listed_seen)
        if not missing:
            return []
        shown = ", ".join(serial_hex(s) for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
        return [f"{self.selection.serial_list}: {len(missing)} listed serials are in no selected issuer's ledger "
                f"rows (or only in rows in error): {shown}"]

    def matches(self, e: LedgerEntry) -> bool:
        s = self.selection
        if s.issuers and e.issuer not in s.issuers:
            return False
        if self.serials is not None:
            if e.serial not in self.serials:
                return False
            self.listed_seen.add(e.serial)
        if s.status and e.status.value != s.status:
            return False
        if s.issued_after or s.issued_before:
            if e.not_before is None:
                self.no_not_before += 1
                return False
            if (s.issued_after and e.not_before < s.issued_after) or (s.issued_before and e.not_before >= s.issued_before):
                return False
        return True


def selection(issuers: list[str], serials: str, after: dt.datetime | None, before: dt.datetime | None,
              status: str, everything: bool) -> Selection:
    """Build a Selection, hashing the serial list file's bytes."""
    digest = ""
    if serials:
        try:
            digest = hashlib.sha256(Path(serials).read_bytes()).hexdigest()
        except OSError as e:
            raise SelectionError(f"{serials}: cannot read serial list: {e.strerror}") from None
    return Selection(sorted(issuers), serials, digest, after, before, status, everything)
