"""`ocspmint run --incremental`: after a complete run, a run plans only the
ledger's changes since then and the journal's scheduled re-signing; it
falls back to a full pass, and says why, when it cannot."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from e2e import ocspmint, openssl_check, response_path
from faultkit import SOFTHSM, assert_journal_matches_store, file_objects, use_module
from ocspmint.demo import Demo, build_demo, issue, revoke
from p11fault.build import build_shim


def sqlite_config(demo: Demo, extra: str = "") -> Path:
    """A copy of the demo config reading the SQLite ledger that ``ingest`` fills."""
    head, _, _ = demo.config.read_text().partition("[[sources]]")
    path = demo.root / "incremental.toml"
    path.write_text(head + extra + '[[sources]]\ntype = "sqlite"\npath = "ledger.sqlite"\n')
    return path


def ingest(demo: Demo) -> None:
    p = ocspmint(demo, "ingest", "--into", str(demo.root / "ledger.sqlite"))
    assert p.returncode == 0, p.stderr


def run(demo: Demo, config: Path, *flags: str, env: dict[str, str] | None = None) -> dict:
    p = ocspmint(demo, "run", "--json", "--quiet", *flags, config=config, env=env)
    assert p.stdout, p.stderr
    summary = json.loads(p.stdout)
    assert p.returncode == (0 if summary["ok"] else 1)
    return summary


def test_incremental_run_plans_only_changes_and_scheduled_resigning(tmp_path):
    demo = build_demo(tmp_path, certs=12, precerts=4, revoke=2)
    ingest(demo)
    config = sqlite_config(demo)

    first = run(demo, config, "--incremental")  # no mark yet: a full pass, saying why
    assert first["ok"] and first["plan"].startswith("full (no run has published everything"), first["plan"]
    assert first["published"] == first["ledger_entries"] - first["expired"] > 0

    idle = run(demo, config, "--incremental")
    assert (idle["plan"], idle["due"], idle["published"], idle["ledger_entries"]) == ("incremental", {}, 0, 0)

    new = issue(demo, precert=True)
    good = next(s for s in demo.serials["good"] if s not in demo.revoked)
    revoke(demo, good, "keyCompromise")
    ingest(demo)
    changed = run(demo, config, "--incremental")
    assert changed["plan"] == "incremental" and changed["due"] == {"new": 1, "changed": 1}, changed
    assert changed["ledger_entries"] == 2 and changed["ok"]
    assert openssl_check(demo, response_path(demo, new), new).status == "good"
    assert openssl_check(demo, response_path(demo, good), good).status == "revoked"

    # the journal schedules routine re-signing: make three records due now
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:
        keys = db.execute("SELECT issuer, serial FROM published WHERE status='good' ORDER BY serial LIMIT 3").fetchall()
        db.executemany("UPDATE published SET refresh_at=1 WHERE issuer=? AND serial=?", keys)
    routine = run(demo, config, "--incremental")
    assert routine["plan"] == "incremental" and routine["due"] == {"refresh": 3} and routine["published"] == 3
    assert run(demo, config, "--incremental")["due"] == {}
    assert len(assert_journal_matches_store(demo, file_objects(demo).get)) == first["published"] + 1

    # a changed refresh_after invalidates the mark: one full pass, then incremental again
    config = sqlite_config(demo, '[response]\nrefresh_after = "P2D"\n')
    assert "refresh_after changed" in run(demo, config, "--incremental")["plan"]
    assert run(demo, config, "--incremental")["plan"] == "incremental"


def test_a_certificate_expiring_before_its_refresh_keeps_runs_incremental(tmp_path):
    """A certificate that expires before its response's refresh time (a
    short-lived one) is scheduled at its notAfter, to be retired then: its
    journal record must not look like one written before refresh_at
    existed, which sent every later --incremental run to a full pass. A
    journal an earlier version left that way is completed by one full pass."""
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    short = issue(demo, days=1)  # refresh_after is 3 days
    ingest(demo)
    config = sqlite_config(demo)
    assert run(demo, config, "--incremental")["plan"].startswith("full (no run has published")
    journal = demo.root / "state" / "journal.sqlite"
    with sqlite3.connect(journal) as db:
        (refresh, not_after), = db.execute("SELECT refresh_at, not_after FROM published WHERE serial=?",
                                           (f"{short:040x}",))
    assert refresh == not_after
    for _ in range(2):
        assert run(demo, config, "--incremental")["plan"] == "incremental"

    with sqlite3.connect(journal) as db:  # as the earlier version wrote it
        db.execute("UPDATE published SET refresh_at=NULL WHERE serial=?", (f"{short:040x}",))
    assert run(demo, config, "--incremental")["plan"].startswith("full (journal records without refresh_at")
    assert run(demo, config, "--incremental")["plan"] == "incremental"


def test_signers_log_in_only_when_a_run_may_sign(tmp_path):
    """A full pass starts its signers while it reads the ledger; an
    incremental run starts them only when something is due, so one with
    nothing due never logs in to the token (every C_Login fails here, and
    the p11fault log gets a line per attempt)."""
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    ingest(demo)
    use_module(demo, build_shim(tmp_path / "shim"))
    config = sqlite_config(demo)
    log = tmp_path / "logins.log"
    no_login = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_LOGIN_RV": "0xA0", "P11FAULT_LOG": str(log)}

    def logins() -> int:
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return sum(" login#" in line for line in lines)

    refused = run(demo, config, "--incremental", env=no_login)  # a full pass: everything is due
    assert not refused["ok"] and refused["published"] == 0 and logins() >= 1
    assert {f["stage"] for f in refused["failures"]} == {"sign"} and "PinIncorrect" in refused["failures"][0]["message"]

    first = run(demo, config, "--incremental", env={"P11FAULT_MODULE": SOFTHSM})
    assert first["ok"] and first["plan"].startswith("full") and first["published"] == 4
    idle = run(demo, config, "--incremental", env=no_login)
    assert idle["ok"] and (idle["plan"], idle["published"], idle["failures"]) == ("incremental", 0, [])
    assert logins() == 0

    revoke(demo, next(iter(demo.serials["good"])), "keyCompromise")
    ingest(demo)
    due = run(demo, config, "--incremental", env=no_login)
    assert not due["ok"] and due["plan"] == "incremental" and due["due"] == {"changed": 1}
    assert "PinIncorrect" in due["failures"][0]["message"] and logins() >= 1


def test_incremental_needs_one_sqlite_source(tmp_path):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=0)
    summary = run(demo, demo.config, "--incremental")
    assert summary["ok"] and summary["plan"] == "full (--incremental needs exactly one ledger source of type sqlite)"
