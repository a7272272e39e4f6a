"""The command-line contract scripts rely on (docs/output.md), checked on
the real `ocspmint` command: exit status 0/1/2/130 as documented, usage
errors as one line (never a traceback, never after work began), `--json`
as exactly one JSON document on stdout whose top-level ``ok`` matches the
exit status, serials as 40 hex digits and times in UTC with Z; Ctrl-C
without a traceback from any process; a PIN put in ``pin_env`` by mistake
never printed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e import BIN, ocspmint
from ocspmint.demo import Demo, build_demo

SERIAL = re.compile(r"[0-9a-f]{40}")
UTC_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """A small demo of this module's own, published once (clean)."""
    demo = build_demo(tmp_path_factory.mktemp("contract"), certs=3, precerts=1, revoke=1)
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    return demo


def small_demo(tmp_path: Path) -> Demo:
    return build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)


def one_json(p: subprocess.CompletedProcess[str]) -> dict:
    """stdout is exactly one JSON object (json.loads refuses anything around it)."""
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert isinstance(doc, dict), p.stdout[:500]
    return doc


def usage_error(p: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, nothing on stdout, no traceback, the option named on stderr."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert p.stdout == "" and "Traceback" not in p.stderr, p.stderr[-3000:]
    for w in words:
        assert w in p.stderr, p.stderr


def walk(doc: object, path: str = "$"):
    """(path, key, value) of every dict item in ``doc``."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for n, v in enumerate(doc):
            yield from walk(v, f"{path}[{n}]")


def check_forms(doc: dict) -> None:
    """Serials 40 hex digits (or "" when none is named); times UTC with Z."""
    for where, key, value in walk(doc):
        if key == "serial" and value:
            assert SERIAL.fullmatch(value), (where, value)
        if key in ("started", "finished", "now", "recorded", "issued_after", "issued_before", "producedAt",
                   "thisUpdate", "nextUpdate", "time") and value is not None:
            assert UTC_Z.fullmatch(value), (where, key, value)


# ------------------------------------------------------------------ --json: one document, ok = exit 0


def test_every_json_output_is_one_document_whose_ok_matches_the_exit_status(published):
    """run, reissue --dry-run (also --clock-was-fast), audit: stdout parses
    whole, the top-level ok is true and the exit status 0; reissue
    --dry-run had no ok at all (its `ok` is a property msgspec does not
    encode)."""
    for args in (["run", "--json", "--quiet"],
                 ["reissue", "--all", "--reason", "estimate", "--dry-run", "--json"],
                 ["reissue", "--clock-was-fast", "--reason", "estimate", "--dry-run", "--json"],
                 ["audit", "--json", "--quiet"]):
        p = ocspmint(published, *args)
        doc = one_json(p)
        assert p.returncode == 0 and doc.get("ok") is True, (args, p.returncode, p.stdout[-1500:], p.stderr[-1500:])
        check_forms(doc)


def test_a_dry_run_missing_ledger_rows_says_ok_false_in_its_json(tmp_path):
    """A ledger source that cannot be read: the dry run's counts miss its
    rows, exit 1, and the JSON says so with ok false beside its
    ledger_failures (stage, issuer, serial, source, message)."""
    demo = small_demo(tmp_path)
    demo.index.rename(demo.index.with_name("index.moved"))
    p = ocspmint(demo, "reissue", "--all", "--reason", "estimate", "--dry-run", "--json")
    doc = one_json(p)
    assert p.returncode == 1 and doc.get("ok") is False, (p.stdout, p.stderr)
    assert [set(f) for f in doc["ledger_failures"]] == [{"stage", "issuer", "serial", "source", "message"}]
    assert doc["ledger_failures"][0]["source"] == str(demo.index)


# ------------------------------------------------------------------ usage errors: exit 2, one line, nothing done


@pytest.mark.parametrize("rate", ["nan", "inf", "-5"])
def test_a_rate_that_is_not_a_finite_number_from_0_up_is_a_usage_error(tmp_path, rate):
    """--rate nan/inf crashed the run with a traceback (exit 1) after the
    job was recorded in the journal; -5 was taken as "no cap" and a dry
    run printed a negative duration. Now argparse refuses them: exit 2,
    no job recorded."""
    demo = small_demo(tmp_path)
    for extra in ([], ["--dry-run"]):
        p = ocspmint(demo, "reissue", "--all", "--reason", "r", "--quiet", "--json", "--rate", rate, *extra)
        usage_error(p, "--rate", rate)
    assert not (demo.root / "state").exists()  # refused before the state folder (and its journal) was touched


@pytest.mark.parametrize("option", ["--issued-after", "--issued-before"])
@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_time_out_of_range_in_utc_is_a_usage_error(published, option, when):
    """A valid ISO 8601 time with a zone that is before year 1 or after
    9999 in UTC raised OverflowError: a traceback and exit 1."""
    p = ocspmint(published, "reissue", "--reason", "r", "--dry-run", option, when)
    usage_error(p, option, "out of range")


# ------------------------------------------------------------------ unusable: one line naming it


def test_verify_names_a_store_it_cannot_open(tmp_path):
    """verify (as run, reissue and refresh) names the store: before, only
    `ocspmint: no AWS credentials ...: ValueError`."""
    demo = small_demo(tmp_path)
    text = demo.config.read_text()
    demo.config.write_text(text.replace('url = "file:responses"', 'url = "s3://bucket/ocsp"\nendpoint = "http://127.0.0.1:9"'))
    env = {k: v for k, v in demo.env().items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    for args in (["verify"], ["verify", "--json"], ["verify", "--store", "s3://other/x"]):
        p = subprocess.run([str(BIN / "ocspmint"), *args, "--config", str(demo.config)], env=env, capture_output=True,
                           text=True, timeout=120)
        url = args[-1] if "--store" in args else "s3://bucket/ocsp"
        assert p.returncode == 2 and p.stdout == "", (args, p.stdout, p.stderr)
        assert p.stderr.splitlines() == [f"ocspmint: {url}: cannot open the store: no AWS credentials from the "
                                         "environment or shared config: ValueError"], (args, p.stderr)


def test_demo_without_its_tools_is_one_line_exit_2(tmp_path):
    """`ocspmint demo` with no openssl on PATH: a traceback (RuntimeError,
    exit 1) before; now one line naming the folder and the tool, exit 2."""
    empty = tmp_path / "bin"
    empty.mkdir()
    root = tmp_path / "d"
    p = subprocess.run([str(BIN / "ocspmint"), "demo", "--dir", str(root), "--quiet"], env={**os.environ, "PATH": str(empty)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith(f"ocspmint: {root}: cannot make the demo: "), p.stderr
    assert "openssl" in p.stderr


# ------------------------------------------------------------------ Ctrl-C: 130, said on stderr


def start_slow_reissue(demo: Demo) -> subprocess.Popen[str]:
    """A reissue of every entry at 2 responses/s (seconds long), --json;
    returned once it signs (its journal exists)."""
    p = subprocess.Popen([str(BIN / "ocspmint"), "reissue", "--all", "--reason", "slow", "--rate", "2", "--json",
                          "--quiet", "--config", str(demo.config)], env=demo.env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (demo.root / "state" / "journal.sqlite").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    return p


def test_ctrl_c_exits_130_and_says_so(tmp_path):
    """SIGINT to ocspmint: exit 130 with `ocspmint: interrupted` on stderr
    (before: nothing at all), nothing on stdout although --json."""
    demo = build_demo(tmp_path / "demo", certs=8, precerts=0, revoke=0)
    p = start_slow_reissue(demo)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and out == "", (p.returncode, out, err)
    assert err.splitlines()[-1:] == ["ocspmint: interrupted"] and "Traceback" not in err, err[-3000:]


def test_ctrl_c_at_the_terminal_prints_no_traceback(tmp_path):
    """Ctrl-C at a terminal signals the whole foreground process group,
    the spawned signer workers included."""
    demo = build_demo(tmp_path / "demo", certs=8, precerts=0, revoke=0)
    p = start_slow_reissue(demo)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]


# ------------------------------------------------------------------ verify's ok, pin_env


def test_verify_json_has_ok(published):
    p = ocspmint(published, "verify", "--json")
    assert p.returncode == 0 and one_json(p).get("ok") is True


def test_a_pin_given_as_pin_env_by_mistake_is_not_printed(tmp_path):
    demo = small_demo(tmp_path)
    pin = (demo.root / "pin.txt").read_text().strip()
    text = demo.config.read_text()
    demo.config.write_text(re.sub(r'(?m)^pin_file = .*$', f'pin_env = "{pin}"', text))
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 2 and pin not in p.stdout + p.stderr, p.stderr


def test_a_blank_reason_and_files_with_store_are_usage_errors(tmp_path):
    """Before: `reissue --reason ""` recorded a job without a reason, and
    `verify --store URL FILE` checked the files and silently ignored the
    store."""
    demo = small_demo(tmp_path)
    p = ocspmint(demo, "reissue", "--reason", " ", "--all")
    assert p.returncode == 2 and "give the reason" in p.stderr and "Traceback" not in p.stderr, p.stderr
    some = tmp_path / "response.der"
    some.write_bytes(b"\x30\x03\x0a\x01\x06")
    p = ocspmint(demo, "verify", "--store", "file:/nonexistent", str(some))
    assert p.returncode == 2 and p.stderr.strip() == ("ocspmint: verify: give response files or --store, not both "
                                                      "(files are checked as they are)"), p.stderr


def test_a_file_where_the_store_folder_goes_stops_run_at_start(tmp_path):
    """Before: `run` went on and failed every serial, one store failure each."""
    demo = small_demo(tmp_path)
    target = tmp_path / "not-a-folder"
    target.write_text("")
    demo.config.write_text(demo.config.read_text().replace('url = "file:responses"', f'url = "file:{target}"'))
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"{target}: store folder is a file, not a folder" in p.stderr


def test_audit_of_a_store_folder_that_does_not_exist_is_exit_2(tmp_path):
    """Before: every ledger serial was a finding (http_error), exit 1."""
    demo = small_demo(tmp_path)
    p = ocspmint(demo, "audit", "--store", f"file:{tmp_path / 'missing'}")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"{tmp_path / 'missing'}: store folder does not exist" in p.stderr


# ------------------------------------------------------------------ ingest: says what it did


def test_ingest_says_it_skipped_sqlite_sources_and_that_nothing_was_ingested(tmp_path):
    """Before, a config whose sources are all sqlite (the ledger itself)
    printed only "0 error(s)": nothing said that no row was read. Exit 0
    still (nothing was due), and the `--into` ledger is still opened for
    writing (docs/ledger.md: how an upgraded ledger gets its change log)."""
    demo = small_demo(tmp_path)
    db = demo.root / "ledger.sqlite"
    p = ocspmint(demo, "ingest", "--into", str(db))
    assert p.returncode == 0 and "nothing ingested" not in p.stdout and ": skipped" not in p.stdout, p.stdout
    head, _, _ = demo.config.read_text().partition("[[sources]]")
    only_sqlite = demo.root / "sqlite.toml"
    only_sqlite.write_text(head + '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')

    p = ocspmint(demo, "ingest", "--into", str(db), config=only_sqlite)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert p.stdout.splitlines() == [
        f"sqlite {db}: skipped (a sqlite source is a ledger ingest writes into, not one it reads)",
        f"nothing ingested: the config has no openssl-index or certdir source; {db} was only opened for writing "
        "(which brings its schema and change log up to date)",
        "0 error(s)"], p.stdout
    typo = demo.root / "ledgr.sqlite"
    p = ocspmint(demo, "ingest", "--into", str(typo), config=only_sqlite)
    assert p.returncode == 0 and f"; {typo} was created, empty" in p.stdout, p.stdout

    both = demo.root / "both.toml"  # the index read, the sqlite source skipped and said so
    both.write_text(demo.config.read_text() + '\n[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')
    p = ocspmint(demo, "ingest", "--into", str(db), config=both)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[0].startswith(f"sqlite {db}: skipped") and lines[-1] == "0 error(s)", p.stdout
    assert any(line.startswith(f"openssl-index {demo.index}: read ") for line in lines), p.stdout
