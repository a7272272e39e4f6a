"""Selections of ledger entries for `ocspmint reissue` and `ocspmint audit`.

A ``Selection`` matches a LedgerEntry by issuer names, a serial list file,
a notBefore (issuance) time range and status; an empty selection matches
nothing unless ``everything`` is set, so a typo never re-signs a whole CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import msgspec

from ocspmint.model import LedgerEntry


class SelectionError(Exception):
    """A selector is unusable; the message names the file and line."""


def read_serial_list(path: str) -> set[int]:
    """Serials from a text file: one per line, hex with optional ``0x``
    and ``:`` separators (``0A:1B`` as browsers show them); blank lines
    and ``#`` comments ignored. Raises SelectionError naming path:line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SelectionError(f"{path}: cannot read serial list: {e}") from None
    serials: set[int] = set()
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip().replace(":", "")
        if not text:
            continue
        try:
            serial = int(text[2:] if text.lower().startswith("0x") else text, 16)
        except ValueError:
            raise SelectionError(f"{path}:{n}: {line.strip()!r} is not a hex serial") from None
        if serial <= 0:
            raise SelectionError(f"{path}:{n}: serial must be positive")
        serials.add(serial)
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
    entries a time range could not judge (a ledger without notBefore)."""

    def __init__(self, selection: Selection) -> None:
        if selection.empty():
            raise SelectionError("nothing selected: give --issuer, --serials, --issued-after/--issued-before, --status or --all")
        self.selection = selection
        self.serials = read_serial_list(selection.serial_list) if selection.serial_list else None
        self.no_not_before = 0

    def matches(self, e: LedgerEntry) -> bool:
        s = self.selection
        if s.issuers and e.issuer not in s.issuers:
            return False
        if self.serials is not None and e.serial not in self.serials:
            return False
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
