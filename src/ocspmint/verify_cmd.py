"""`ocspmint verify`: check stored responses against issuers and the ledger.

Every response is matched to its issuer by the CertID's issuerKeyHash and
checked by the verifier against the ledger entry for its serial (status,
revocation, times, signature, signer, encoding). A response for a serial
the ledger does not know is a finding (BR 4.9.9: never `good` for an
unassigned serial); so is a store object whose key does not name the
serial inside it. A ledger row in error that names no serial fails the
command (exit 1) whatever the responses say, as it fails `run` and `audit`:
it may be the row of any serial checked (a revocation whose serial field is
garbled), so no response can be called right while it stands. A row in
error that names a serial (or two sources stating one differently) fails
that serial's response; with no response checked for that serial (none
published yet: a certificateHold, a conflict), it fails the command the same
way, listed with the ledger errors: verify never ends OK while the ledger
holds a row it cannot read.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
from cryptography.x509 import ocsp

from ocspmint.config import Config
from ocspmint.issuer import IssuerIdentity, load_issuers
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, LedgerError, serial_hex, utc_now
from ocspmint.store import StoreError, folder_missing, object_key, open_store
from ocspmint.verifier import Expectation, describe, verify_response

Key = tuple[str, int]  # (issuer name, serial)
LISTED = 50  # ledger rows in error listed (as `audit` lists its ledger errors)


class Checked(msgspec.Struct):
    """One verified response: ``findings`` empty means it is right."""

    path: str
    issuer: str = ""
    serial: str = ""
    status: str = ""
    findings: list[str] = msgspec.field(default_factory=list)
    response: dict = msgspec.field(default_factory=dict)


def _issuer_of(der: bytes, issuers: list[IssuerIdentity]) -> tuple[IssuerIdentity | None, int | None]:
    try:
        single = next(iter(ocsp.load_der_ocsp_response(der).responses))
    except (ValueError, StopIteration):
        return None, None
    for ident in issuers:
        if single.issuer_key_hash in ident.key_hash.values():
            return ident, single.serial_number
    return None, single.serial_number


class Ledger(msgspec.Struct):
    """What the configured sources say, for ``check_one``.

    ``entries``: (issuer, serial) → entry, for serials every source states
    alike. ``in_error``: (issuer, serial) → why its state is unknown (a
    ledger row in error naming it, or two sources stating it differently).
    ``unnamed``: ledger errors that name no serial (``path:line: why``).
    """

    entries: dict[Key, LedgerEntry] = msgspec.field(default_factory=dict)
    in_error: dict[Key, str] = msgspec.field(default_factory=dict)
    unnamed: list[str] = msgspec.field(default_factory=list)


def read_ledger(config: Config, by_name: dict[str, IssuerIdentity]) -> Ledger:
    """Every source of ``config`` into a Ledger. A serial a bad row names
    or two sources state differently (status, revocationTime or reason,
    as ``pipeline.stated_differently``) goes to ``in_error``, never to
    ``entries``. Raises LedgerError for a source unusable as a whole."""
    from ocspmint.pipeline import stated_differently

    ledger = Ledger()
    for source in config.sources:
        for item in read_source(source, by_name):
            if isinstance(item, LedgerError):
                if item.key is None:
                    ledger.unnamed.append(str(item))
                else:
                    ledger.in_error.setdefault(item.key, str(item))
                continue
            key = (item.issuer, item.serial)
            first = ledger.entries.setdefault(key, item)
            if first is not item and (differs := stated_differently(first, item)) is not None:
                ledger.in_error.setdefault(key, str(differs))
    for key in ledger.in_error:
        ledger.entries.pop(key, None)
    return ledger


def check_one(path: str, der: bytes, issuers: list[IssuerIdentity], ledger: Ledger, config: Config,
              key: str | None = None) -> Checked:
    """Verify one response; ``key`` is its store key when read from a store.

    The verifier's checks (RFC 6960 §4.2, BR 4.9.9; the validity interval
    against BR 4.9.9's bounds, not the configured ``validity``), and: the CertID
    names no configured issuer; the serial is not in the ledger; a ledger
    row in error names it (state unknown); the store key names another
    serial."""
    ident, serial = _issuer_of(der, issuers)
    if ident is None:
        findings = verify_response(der, issuers[0], None, utc_now()) if serial is None else []
        shown = "" if serial is None else serial_hex(serial) if serial >= 0 else hex(serial)
        return Checked(path, serial=shown, findings=findings or ["issuer: issuerKeyHash matches no configured issuer"],
                       response=describe(der))
    error = ledger.in_error.get((ident.name, serial))
    entry = None if error is not None else ledger.entries.get((ident.name, serial))
    # no configured validity: a response signed before [response] validity changed is right until
    # re-signed (its interval within BR 4.9.9's bounds is still checked), as in `ocspmint audit`
    expect = None if entry is None else Expectation(entry, tuple(config.response.certid_hashes))
    findings = verify_response(der, ident, expect, utc_now())
    if error is not None:
        findings.append(f"ledger: the serial's ledger state is unknown, no response for it can be right ({error})")
    elif entry is None:
        hint = (f"; {len(ledger.unnamed)} ledger rows in error name no serial, it may be one of them"
                if ledger.unnamed else "")
        findings.append(f"ledger: serial is not in the ledger (never assigned?){hint}")
    if key is not None and key != object_key(ident.id, serial):
        findings.append(f"store: key {key} does not name serial {serial_hex(serial)} of {ident.name}")
    status = "" if entry is None else entry.status.value
    return Checked(path, ident.name, serial_hex(serial), status, findings, describe(der))


def unchecked_errors(ledger: Ledger, checked: set[tuple[str, str]]) -> list[str]:
    """The ledger's rows in error naming a serial no response was checked
    for (``checked``: (issuer name, serial hex) of the responses checked),
    each ``file:line: why (issuer NAME serial HEX: ...)``: the serial's
    state is unknown, as for a row naming no serial."""
    return [f"{why} (issuer {issuer} serial {serial_hex(serial)}: no response for it was checked)"
            for (issuer, serial), why in ledger.in_error.items() if (issuer, serial_hex(serial)) not in checked]


def _responses(config: Config, files: list[str], store_url: str | None) -> Iterator[tuple[str, bytes | str, str | None]]:
    """(path, bytes or why they cannot be read, store key or None) per
    response. Raises StoreError when the store as a whole is unusable."""
    if files:
        for f in files:
            yield f, Path(f).read_bytes(), None
        return
    url = store_url or config.store.url
    store = open_store(url, config.store)
    if problem := folder_missing(url):
        raise StoreError(problem)
    for key in store.keys():
        try:
            data = store.get(key)
        except OSError as e:  # a file store's object: EACCES, EIO, a symlink loop
            yield key, f"store: cannot read the object: {e.strerror or e}", key
            continue
        except StoreError as e:
            yield key, f"store: cannot read the object: {e}", key
            continue
        yield key, "store: no object at this key any more (deleted while verifying?)" if data is None else data, key


def verify_command(config: Config, files: list[str], store_url: str | None, as_json: bool) -> int:
    """Print one line (or JSON record) per response; return 1 on any
    finding, when nothing was checked (an empty store), when ledger rows
    in error name no serial (any response checked may be theirs), or when
    rows in error name a serial no response was checked for
    (``unchecked_errors``); those rows are listed as ``file:line: why``,
    the first LISTED.

    JSON: ``{"ok": bool (the exit status is 0), "checked": int,
    "with_findings": int, "ledger_errors_without_serial": int,
    "ledger_errors_without_response": int, "ledger_errors": [str] (those
    rows, without serial first, the first LISTED), "responses":
    [Checked]}``. Raises LedgerError (a source unusable) and StoreError
    (the store unusable) for the caller (exit 2)."""
    issuers = list(load_issuers(config).values())
    by_name = {i.name: i for i in issuers}
    ledger = read_ledger(config, by_name)
    results: list[Checked] = []
    seen: set[tuple[str, str]] = set()  # (issuer name, serial hex) of the responses checked that rows in error name
    checked = bad = 0
    for p, der, key in _responses(config, files, store_url):
        r = Checked(p, findings=[der]) if isinstance(der, str) else check_one(p, der, issuers, ledger, config, key)
        checked += 1
        bad += bool(r.findings)
        if r.serial and (r.issuer, int(r.serial, 16)) in ledger.in_error:
            seen.add((r.issuer, r.serial))
        if as_json:
            results.append(r)
        else:
            state = "OK" if not r.findings else "FAIL " + "; ".join(r.findings)
            print(f"{r.path}: {state} (issuer {r.issuer or '?'} serial {r.serial or '?'} {r.status})")
    unanswered = unchecked_errors(ledger, seen)
    errors = [*ledger.unnamed, *unanswered]
    unnamed = len(ledger.unnamed)
    ok = bool(checked) and not bad and not errors
    if as_json:
        doc = {"ok": ok, "checked": checked, "with_findings": bad, "ledger_errors_without_serial": unnamed,
               "ledger_errors_without_response": len(unanswered), "ledger_errors": errors[:LISTED],
               "responses": results}
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode() + "\n")
    else:
        for error in errors[:LISTED]:
            print(f"ledger: {error}")
        if len(errors) > LISTED:
            print(f"ledger: ... and {len(errors) - LISTED} more rows in error")
        if unnamed:
            print(f"{unnamed} ledger rows in error name no serial: any response checked may be for one of them, so "
                  "none can be called right until they are corrected (`ocspmint run` and `audit` fail on them too)")
        if unanswered:
            print(f"{len(unanswered)} ledger rows in error name a serial no response was checked for: its state is "
                  "unknown until they are corrected (`ocspmint run` and `audit` fail on them too)")
        print(f"{checked} responses checked, {bad} with findings")
    if not checked:
        print(f"ocspmint: {store_url or config.store.url}: the store holds no object: nothing was verified", file=sys.stderr)
    return 0 if ok else 1
