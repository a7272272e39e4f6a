"""Helpers for the fault and bad-input tests (test_hsm_faults, test_store_faults,
test_bad_input): edit a demo's config, read its journal, and check that the
journal and the store agree after a run that failed part-way."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from e2e import issuer_id, ocspmint
from ocspmint.demo import Demo
from ocspmint.model import serial_hex
from ocspmint.store import object_key

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def edit_config(demo: Demo, old: str, new: str) -> None:
    """Replace the one occurrence of ``old`` in the demo's config."""
    text = demo.config.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {demo.config}"
    demo.config.write_text(text.replace(old, new))


def use_module(demo: Demo, module: Path) -> None:
    """Sign through ``module`` (the p11fault shim) instead of SoftHSM2."""
    edit_config(demo, f'module = "{SOFTHSM}"', f'module = "{module}"')


def set_signing(demo: Demo, **keys: int) -> None:
    """Set ``[signing]`` keys (workers, batch_size, retries)."""
    lines = "\n".join(f"{k} = {v}" for k, v in keys.items())
    edit_config(demo, "[signing]\nworkers = 2", "[signing]\n" + lines)


def journal_rows(demo: Demo) -> dict[tuple[str, int], bytes]:
    """(issuer, serial) → sha256 of the published DER, for every journal row."""
    path = demo.root / "state" / "journal.sqlite"
    if not path.exists():
        return {}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {(i, int(s, 16)): h for i, s, h in db.execute("SELECT issuer, serial, sha256 FROM published")}


def file_objects(demo: Demo, folder: str = "responses") -> dict[str, bytes]:
    """Store key → bytes of every object of a file store (``.tmp`` excluded)."""
    root = demo.root / folder
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".tmp" not in p.relative_to(root).parts}


def assert_journal_matches_store(demo: Demo, read: Callable[[str], bytes | None]) -> dict[tuple[str, int], bytes]:
    """Every journal row names an object that ``read(key)`` returns with the
    journaled SHA-256: nothing journaled is missing or corrupt. Returns the rows."""
    rows = journal_rows(demo)
    iid = issuer_id(demo)
    for (_, serial), digest in rows.items():
        data = read(object_key(iid, serial))
        assert data is not None, f"journaled serial {serial_hex(serial)} has no object in the store"
        assert hashlib.sha256(data).digest() == digest, f"object of serial {serial_hex(serial)} differs from the journal"
    return rows


def failed_serials(summary: dict, stage: str) -> set[int]:
    """Serials of the run summary's failures at ``stage``."""
    return {int(f["serial"], 16) for f in summary["failures"] if f["stage"] == stage}


def verify_clean(demo: Demo, env: dict[str, str] | None = None, config: Path | None = None) -> int:
    """`ocspmint verify --json` over the whole store: asserts no finding and
    returns how many objects it checked."""
    p = ocspmint(demo, "verify", "--json", env=env, config=config)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    m = re.search(r'"checked":\s*(\d+)', p.stdout)
    assert m, p.stdout[-2000:]
    return int(m.group(1))


def wait_for(check: Callable[[], object], what: str, timeout: float = 60, step: float = 0.1) -> object:
    """``check()``'s first truthy result, polled every ``step`` s; an
    AssertionError naming ``what`` after ``timeout`` s (tests never time,
    they wait for what they need to see)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
