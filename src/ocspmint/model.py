"""Records that flow through the pipeline: ledger entries and statuses.

Serials are Python ints (positive, at most 20 octets, RFC 5280 §4.1.2.2);
all datetimes are timezone-aware UTC with whole seconds.
"""

from __future__ import annotations

import datetime as dt
import enum

import msgspec

UTC = dt.timezone.utc
MAX_SERIAL = (1 << 160) - 1


class Status(enum.Enum):
    """Certificate status as the ledger holds it (RFC 6960 §2.2)."""

    GOOD = "good"
    REVOKED = "revoked"


class Kind(enum.Enum):
    """What the ledger row was read from; both get OCSP (MRSP §5.4)."""

    CERTIFICATE = "certificate"
    PRECERTIFICATE = "precertificate"


class Reason(enum.IntEnum):
    """CRLReason (RFC 5280 §5.3.1). certificateHold is refused (BR 7.3)."""

    unspecified = 0
    keyCompromise = 1
    cACompromise = 2
    affiliationChanged = 3
    superseded = 4
    cessationOfOperation = 5
    certificateHold = 6
    removeFromCRL = 8
    privilegeWithdrawn = 9
    aACompromise = 10


class LedgerError(Exception):
    """A ledger row that cannot be trusted; names its source ("file:line")."""

    def __init__(self, source: str, message: str, key: tuple[str, int] | None = None) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message
        self.key = key  # (issuer, serial) when the row names a serial that must then not be published at all


class RowRemoved(LedgerError):
    """A row that left its source: a SQLite ``entries`` row deleted (or its
    issuer/serial changed), an index.txt line removed, every certificate
    of a serial removed from a certdir folder. ``key`` names the serial
    (None when a logged serial does not parse). A reader following the
    source's changes yields it; ``pipeline.forgetting_unknown`` decides
    whether it is a failure (not when nothing of the serial is served)."""


class LedgerEntry(msgspec.Struct, frozen=True, gc=False):
    """One assigned serial of one issuer.

    ``issuer`` is the issuer's name from the config; ``source`` names where
    the row came from (``path:line`` or a file path) for error messages.
    ``revoked_at``/``reason`` are set only when ``status`` is REVOKED; a
    reason of unspecified is stored as None (BR 7.3.2: omit it).
    ``not_before`` is the certificate's notBefore, None when the source does
    not hold it (a version-1 SQLite ledger, a row written without it).
    ``gc=False``: its fields are scalars, so it can be in no reference
    cycle; untracked, the entries of a plan cost the cycle collector
    nothing (0.11 → 0.075 s per 50,000-serial run, bench/RESULTS.md).
    """

    issuer: str
    serial: int
    kind: Kind
    not_after: dt.datetime
    status: Status
    revoked_at: dt.datetime | None = None
    reason: Reason | None = None
    source: str = ""
    not_before: dt.datetime | None = None


def utc_now() -> dt.datetime:
    """The current time, aware UTC, truncated to whole seconds."""
    return dt.datetime.now(UTC).replace(microsecond=0)


def future_revocation(label: str, revoked_at: dt.datetime) -> str | None:
    """Why a ledger's revocation time cannot be used, naming it ``label``:
    it lies after now (a local time written as UTC, a typo); None when it
    does not. revocationTime is when it happened (RFC 6960 §4.2.1)."""
    if revoked_at <= (now := utc_now()):
        return None
    return (f"{label} {revoked_at:%Y-%m-%dT%H:%M:%SZ} is in the future (now {now:%Y-%m-%dT%H:%M:%SZ}); a local time "
            "written as UTC? (revocationTime is when it happened, RFC 6960 §4.2.1)")


def check_serial(serial: int, source: str) -> int:
    """Return ``serial`` if it is a serial a CA can have issued, else raise.

    Raises LedgerError naming ``source`` for zero, negative or more than
    160 bits. A 160-bit serial has 21 octets in DER (leading 00), beyond
    RFC 5280's 20; it is accepted because a certificate a CA did issue must
    still get OCSP, misissued or not.
    """
    if serial <= 0 or serial > MAX_SERIAL:
        raise LedgerError(source, f"serial {serial:#x} is not a positive integer of at most 20 octets")
    return serial


def serial_hex(serial: int) -> str:
    """Fixed-width (40 hex digit) lowercase form; sorts like the integer."""
    return format(serial, "040x")
