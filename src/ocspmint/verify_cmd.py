"""`ocspmint verify`: check stored responses against issuers and the ledger.

Every response is matched to its issuer by the CertID's issuerKeyHash and
checked by the verifier against the ledger entry for its serial (status,
revocation, times, signature, signer, encoding). A response for a serial
the ledger does not know is a finding (BR 4.9.9: never `good` for an
unassigned serial); so is a store object whose key does not name the
serial inside it.
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
from ocspmint.model import LedgerEntry, serial_hex, utc_now
from ocspmint.store import object_key, open_store
from ocspmint.verifier import Expectation, describe, verify_response


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


def check_one(path: str, der: bytes, issuers: list[IssuerIdentity], ledger: dict[tuple[str, int], LedgerEntry],
              config: Config, key: str | None = None) -> Checked:
    """Verify one response; ``key`` is its store key when read from a store."""
    ident, serial = _issuer_of(der, issuers)
    if ident is None:
        findings = verify_response(der, issuers[0], None, utc_now()) if serial is None else []
        return Checked(path, findings=findings or ["issuer: issuerKeyHash matches no configured issuer"])
    entry = ledger.get((ident.name, serial))
    expect = None if entry is None else Expectation(entry, tuple(config.response.certid_hashes), config.response.validity)
    findings = verify_response(der, ident, expect, utc_now())
    if entry is None:
        findings.append("ledger: serial is not in the ledger (never assigned?)")
    if key is not None and key != object_key(ident.id, serial):
        findings.append(f"store: key {key} does not name serial {serial_hex(serial)} of {ident.name}")
    status = "" if entry is None else entry.status.value
    return Checked(path, ident.name, serial_hex(serial), status, findings, describe(der))


def _responses(config: Config, files: list[str], store_url: str | None) -> Iterator[tuple[str, bytes, str | None]]:
    if files:
        for f in files:
            yield f, Path(f).read_bytes(), None
        return
    store = open_store(store_url or config.store.url, config.store)
    for key in store.keys():
        yield key, store.get(key) or b"", key


def verify_command(config: Config, files: list[str], store_url: str | None, as_json: bool) -> int:
    """Print one line (or JSON record) per response; return 1 on any finding."""
    issuers = list(load_issuers(config).values())
    by_name = {i.name: i for i in issuers}
    ledger: dict[tuple[str, int], LedgerEntry] = {}
    for source in config.sources:
        for item in read_source(source, by_name):
            if isinstance(item, LedgerEntry):
                ledger[(item.issuer, item.serial)] = item
    results = [check_one(p, der, issuers, ledger, config, key) for p, der, key in _responses(config, files, store_url)]
    bad = [r for r in results if r.findings]
    if as_json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode({"checked": len(results), "with_findings": len(bad), "responses": results}), indent=2).decode() + "\n")
    else:
        for r in results:
            state = "OK" if not r.findings else "FAIL " + "; ".join(r.findings)
            print(f"{r.path}: {state} (issuer {r.issuer or '?'} serial {r.serial or '?'} {r.status})")
        print(f"{len(results)} responses checked, {len(bad)} with findings")
    return 1 if bad or not results else 0
