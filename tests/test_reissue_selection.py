"""`ocspmint reissue` selections (selection.py) that would select nothing or
something else than written, on a real demo (openssl CA, SoftHSM2 token)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from e2e import ocspmint, run_json
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo
from ocspmint.issuer import load_issuers
from ocspmint.ledger import read_source
from ocspmint.model import LedgerEntry, serial_hex
from ocspmint.selection import Selection, SelectionError, Selector, read_serial_list


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    demo = build_demo(tmp_path_factory.mktemp("sel"), certs=3, precerts=1, revoke=1)
    assert run_json(demo)[0] == 0
    return demo


def refused(demo: Demo, *args: str) -> str:
    for dry in ((), ("--dry-run",)):
        p = ocspmint(demo, "reissue", "--reason", "review", "--quiet", *args, *dry)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, dry, p.returncode, p.stdout, p.stderr)
        assert "REISSUE OK" not in p.stdout
    return p.stderr.strip()


def test_a_serial_list_without_serials_is_refused(demo: Demo, tmp_path: Path) -> None:
    """Before: selected nothing, then "REISSUE OK", exit 0."""
    listed = tmp_path / "empty.txt"
    listed.write_text("# the incident's serials go here\n\n")
    assert refused(demo, "--serials", str(listed)) == f"ocspmint: {listed}: the serial list holds no serial " \
                                                      "(only blank lines or comments)"


def test_a_time_range_holding_no_instant_is_refused(demo: Demo) -> None:
    """Before: [after, before) with after ≥ before selected nothing, exit 0."""
    msg = refused(demo, "--issued-after", "2026-03-02T00:00:00Z", "--issued-before", "2026-03-01T00:00:00Z")
    assert "is not before --issued-before" in msg and "selects nothing" in msg
    assert "selects nothing" in refused(demo, "--issued-after", "2026-03-01T00:00:00Z",
                                        "--issued-before", "2026-03-01T00:00:00Z")


@pytest.mark.parametrize("line", ["1_0", "+5", "0x0x10", "12 34", "-1", "0", "1" + "0" * 40])
def test_serial_list_lines_that_are_not_one_serial_are_refused(demo: Demo, tmp_path: Path, line: str) -> None:
    """Before: Python's int(text, 16) took ``1_0`` as 0x10, ``+5`` as 5 and
    ``0x0x10`` as 0x10 (another serial than written), and a 161-bit value
    was kept and matched nothing."""
    listed = tmp_path / "serials.txt"
    listed.write_text(f"{demo.serials['good'][0]:x}\n{line}\n")
    assert refused(demo, "--serials", str(listed)).startswith(f"ocspmint: {listed}:2: ")


def test_serial_list_forms_that_are_accepted(tmp_path: Path) -> None:
    listed = tmp_path / "serials.txt"
    listed.write_bytes("\ufeff0A:1B\n0x0c # note\n\n  ff  \n".encode() + b"f" * 40 + b"\n")
    assert read_serial_list(str(listed)) == {0x0A1B, 0x0C, 0xFF, (1 << 160) - 1}


def test_an_issuer_name_not_configured_is_refused(demo: Demo) -> None:
    """Before: ``--issuer issuing-CA`` (a typo) selected nothing, then
    "REISSUE OK", exit 0, and the job was recorded finished."""
    assert refused(demo, "--issuer", "issuing-CA") == ("ocspmint: --issuer 'issuing-CA': no issuer of that name in "
                                                       "the config (configured: issuing-ca)")


def test_listed_serials_the_ledger_lacks_make_the_reissue_not_done(demo: Demo, tmp_path: Path) -> None:
    """A serial list naming one issued serial and one the ledger does not
    hold: the issued one is re-signed, the other named, exit 1 (the dry run
    says INCOMPLETE); before, "REISSUE OK", exit 0."""
    good = demo.serials["good"][0]
    listed = tmp_path / "serials.txt"
    listed.write_text(f"{good:x}\ndeadbeef\n")
    missing = f"{listed}: 1 listed serials are in no selected issuer's ledger rows (or only in rows in error): " \
              f"{serial_hex(0xDEADBEEF)}"
    dry = ocspmint(demo, "reissue", "--reason", "review", "--serials", str(listed), "--dry-run")
    assert dry.returncode == 1 and "INCOMPLETE" in dry.stdout and missing in dry.stdout, dry.stdout
    p = ocspmint(demo, "reissue", "--reason", "review", "--serials", str(listed), "--quiet", "--json")
    out = json.loads(p.stdout)
    assert p.returncode == 1 and not out["ok"] and out["summary"]["published"] == 1, p.stdout
    assert [f["message"] for f in out["summary"]["failures"]] == [missing]
    everything = Selector(Selection(everything=True))
    config = load_config(demo.config)
    entries = [e for e in read_source(config.sources[0], load_issuers(config)) if isinstance(e, LedgerEntry)]
    assert sum(map(everything.matches, entries)) == len(entries) and everything.unlisted() == []
    with pytest.raises(SelectionError):
        Selector(Selection(issued_after=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc),
                           issued_before=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)))
