"""Files and folders a command cannot open: one line `ocspmint: <path>: <why>`
on stderr and exit 2 (cli.py's docstring), never a Python traceback.

Covered: the `ingest --into` ledger database (missing folder, random bytes,
a folder), a config that is not UTF-8, a state folder that is a file or
cannot be made, a journal that is not a database, `verify` response files
that cannot be read, a ledger source or store URL `verify` cannot use, the
closing audit of `reissue` when a ledger source is unusable, and a
`demo --dir` that is a file. Config files that are missing or folders,
unreadable issuer/signer certificates and `--serials` lists were already
reported this way (test_run.py, test_audit.py, test_reissue.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from e2e import BIN, ocspmint
from ocspmint.demo import Demo, build_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo(tmp_path_factory.mktemp("files"), certs=2, precerts=1, revoke=1)


def variant(demo: Demo, name: str, old: str, new: str) -> Path:
    """A copy of the demo config next to it (paths stay relative to the
    demo) with ``old`` replaced by ``new``."""
    text = demo.config.read_text()
    assert old in text
    path = demo.root / f"{name}.toml"
    path.write_text(text.replace(old, new))
    return path


def one_line_error(p: subprocess.CompletedProcess[str], *words: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocspmint: "), p.stderr[-3000:]
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


@pytest.mark.parametrize("where", ["missing folder", "random bytes", "a folder"])
def test_ingest_into_a_ledger_that_cannot_be_opened(demo: Demo, tmp_path: Path, where: str) -> None:
    into = {"missing folder": tmp_path / "nodir" / "x.db", "random bytes": tmp_path / "junk.db",
            "a folder": tmp_path / "folder.db"}[where]
    if where == "random bytes":
        into.write_bytes(os.urandom(4096))
    elif where == "a folder":
        into.mkdir()
    before = into.read_bytes() if into.is_file() else None
    p = ocspmint(demo, "ingest", "--into", str(into))
    line = one_line_error(p, f"ocspmint: {into}: cannot open ledger database: ")
    assert p.stdout == ""
    if where == "missing folder":
        assert "does not exist" in line and not into.parent.exists()
    if before is not None:
        assert into.read_bytes() == before


COMMANDS = {
    "run": ["run", "--quiet"],
    "ingest": ["ingest", "--into", "ledger.sqlite"],
    "verify": ["verify"],
    "serve": ["serve", "--listen", "127.0.0.1:0"],
    "audit": ["audit", "--quiet"],
    "refresh": ["refresh"],
    "reissue": ["reissue", "--reason", "r", "--all", "--dry-run"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_config_that_is_not_utf8(demo: Demo, tmp_path: Path, command: str) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(demo.config.read_bytes() + '# café\n'.encode("latin-1"))
    p = ocspmint(demo, *COMMANDS[command], config=config)
    one_line_error(p, f"ocspmint: {config}: cannot read config: not UTF-8 text")


STATEFUL = {
    "run": ["run", "--quiet"],
    "audit": ["audit", "--quiet"],
    "refresh": ["refresh"],
    "reissue": ["reissue", "--reason", "r", "--all", "--quiet"],
    "reissue --dry-run": ["reissue", "--reason", "r", "--all", "--dry-run"],
}


@pytest.mark.parametrize("command", list(STATEFUL))
def test_state_folder_that_is_a_file(demo: Demo, tmp_path: Path, command: str) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder\n")
    config = variant(demo, f"statefile-{command.replace(' ', '')}", 'state_dir = "state"', f'state_dir = "{state}"')
    one_line_error(ocspmint(demo, *STATEFUL[command], config=config), f"ocspmint: {state}: cannot use state folder: ")
    assert state.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", ["run", "audit"])
def test_state_folder_that_cannot_be_made(demo: Demo, tmp_path: Path, command: str) -> None:
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"
    config = variant(demo, f"statenotdir-{command}", 'state_dir = "state"', f'state_dir = "{state}"')
    one_line_error(ocspmint(demo, *STATEFUL[command], config=config),
                   f"ocspmint: {state}: cannot use state folder: Not a directory")


@pytest.mark.parametrize("command", ["run", "refresh", "reissue", "reissue --dry-run", "audit --fix"])
def test_journal_that_is_not_a_database(demo: Demo, tmp_path: Path, command: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    junk = os.urandom(8192)
    (state / "journal.sqlite").write_bytes(junk)
    config = variant(demo, f"journal-{command.replace(' ', '')}", 'state_dir = "state"', f'state_dir = "{state}"')
    args = ["audit", "--quiet", "--fix"] if command == "audit --fix" else STATEFUL[command]
    one_line_error(ocspmint(demo, *args, config=config),
                   f"ocspmint: {state / 'journal.sqlite'}: cannot open journal: file is not a database")
    assert (state / "journal.sqlite").read_bytes() == junk


def test_verify_inputs_that_cannot_be_read(demo: Demo, tmp_path: Path) -> None:
    (tmp_path / "folder.der").mkdir()
    for name, why in (("missing.der", "No such file or directory"), ("folder.der", "Is a directory")):
        path = tmp_path / name
        p = ocspmint(demo, "verify", str(path))
        one_line_error(p, f"ocspmint: {path}: cannot read response file: {why}")
        assert p.stdout == ""
    one_line_error(ocspmint(demo, "verify", "--store", "bogus://x"), "unsupported store URL 'bogus://x'")
    config = variant(demo, "noindex-verify", 'path = "ca/index.txt"', 'path = "ca/missing-index.txt"')
    one_line_error(ocspmint(demo, "verify", config=config),
                   f"ocspmint: ledger source unusable: {demo.root / 'ca' / 'missing-index.txt'}: cannot read index")


def test_reissue_whose_closing_audit_cannot_read_the_ledger(demo: Demo, tmp_path: Path) -> None:
    config = variant(demo, "noindex-reissue", 'state_dir = "state"', f'state_dir = "{tmp_path / "state"}"')
    config.write_text(config.read_text().replace('path = "ca/index.txt"', 'path = "ca/missing-index.txt"'))
    p = ocspmint(demo, "reissue", "--reason", "r", "--all", "--quiet", config=config)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("ocspmint: ledger source unusable: ") and "missing-index.txt" in last, last
    assert "REISSUE NOT DONE" in last


def test_demo_dir_that_is_a_file_or_not_empty(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    p = subprocess.run([str(BIN / "ocspmint"), "demo", "--dir", str(target)], capture_output=True, text=True,
                       timeout=60)
    one_line_error(p, f"ocspmint: {target}: cannot make the demo there: it is not a folder")
    p = subprocess.run([str(BIN / "ocspmint"), "demo", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    one_line_error(p, f"ocspmint: {tmp_path}: cannot make the demo there: the folder is not empty; remove it or "
                      "pass another --dir")
    assert [f.name for f in tmp_path.iterdir()] == ["file"]
