"""`ocspmint refresh` under faults, with real components: SoftHSM2 behind
the p11fault shim (a token pulled for a while), a file store that cannot
write one serial, purge targets that refuse connections or never answer,
configs that parse but cannot be used on SIGHUP, a clock behind the
journal's. No timing assertions: each test waits for log events, journal
rows or metrics, with generous timeouts.

docs/refresh.md describes what is checked: pending ledger changes (never
dropped, retried with a backoff of their own, never re-signed from the
journal meanwhile), one signer pool per config, reloads that keep the old
config on any failure, purges on threads of their own, and counters that
count each failure once.
"""

from __future__ import annotations

import http.server
import json
import math
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cdn import free_port
from e2e import BIN, ocspmint, openssl_check, response_path
from faultkit import SOFTHSM, use_module, wait_for
from ocspmint.config import load_config
from ocspmint.demo import Demo, build_demo, issue, revoke
from ocspmint.metrics import RefreshMetrics
from ocspmint.model import Status
from ocspmint.refresh import Session

ISSUER = "issuing-ca"


class Refresh:
    """`ocspmint refresh` in a child process, its stderr in ``log``."""

    def __init__(self, demo: Demo, log: Path, env: dict[str, str] | None = None, metrics: int = 0) -> None:
        self.demo, self.log, self.metrics_port = demo, log, metrics
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([str(BIN / "ocspmint"), "refresh", "--config", str(demo.config)],
                                         stdout=out, stderr=subprocess.STDOUT, env={**demo.env(), **(env or {})})

    def events(self, name: str | None = None) -> list[dict]:
        return [e for line in self.log.read_text().splitlines() if line.startswith("{")
                for e in [json.loads(line)] if name is None or e["event"] == name]

    def failures_of(self, serial: int) -> list[dict]:
        return [e for e in self.events("failure") if e["serial"] == f"{serial:040x}"]

    def journal(self, sql: str, *args: object) -> list[tuple]:
        with sqlite3.connect(self.demo.root / "state" / "journal.sqlite", timeout=10) as db:
            return db.execute(sql, args).fetchall()

    def row(self, serial: int) -> tuple | None:
        rows = self.journal("SELECT status, why FROM published WHERE serial = ?", f"{serial:040x}")
        return rows[0] if rows else None

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def signer_workers(self) -> int:
        """Signer processes (spawned multiprocessing children) of the service now."""
        n = 0
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            n += ppid == self.proc.pid and b"spawn_main" in cmdline
        return n

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def refresh(demo: Demo, log: Path, env: dict[str, str] | None = None, metrics: int = 0) -> Iterator[Refresh]:
    svc = Refresh(demo, log, env, metrics)
    try:
        yield svc
    finally:
        svc.kill()


def configure(demo: Demo, extra: str, workers: int = 1) -> None:
    demo.config.write_text(demo.config.read_text().replace("[signing]\nworkers = 2", f"[signing]\nworkers = {workers}")
                           + extra)


def block_store(demo: Demo, serial: int) -> Path:
    """Make the file store unable to write ``serial``'s response (a folder
    where the file goes: the rename fails). Returns the path."""
    path = response_path(demo, serial)
    if path.exists():
        path.unlink()
    (path / "blocked").mkdir(parents=True)
    return path


# 1. A ledger change that fails during the catch-up pass stays pending ------


def test_changes_that_fail_in_the_catch_up_pass_are_retried_until_published(tmp_path, shim):
    """A precertificate issued and a certificate revoked while the service
    was down; at start the token is pulled out for 3 s (the signer's own
    retries give up well before): both fail in the catch-up pass, stay
    pending, are retried with a backoff, and are published once the token
    is back."""
    demo = build_demo(tmp_path / "demo", certs=3, precerts=1, revoke=0)
    use_module(demo, shim)
    configure(demo, '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    assert ocspmint(demo, "run", "--quiet", env={"P11FAULT_MODULE": SOFTHSM}).returncode == 0
    new = issue(demo, precert=True)
    victim = demo.serials["good"][0]
    revoke(demo, victim, "keyCompromise")
    # signature 1 is the key probe; the 2nd, the catch-up pass's first, pulls the token out for 3 s
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_TOKEN_GONE_FROM": "2", "P11FAULT_TOKEN_BACK_MS": "3000"}
    with refresh(demo, tmp_path / "refresh.log", env) as svc:
        [first] = wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        assert first["failures"] == 2 and first["pending"] == 2 and first["due"] == {"new": 1, "changed": 1}, first
        wait_for(lambda: svc.row(new) and svc.row(victim) == ("revoked", "changed"), "both changes published")
        assert svc.row(new) == ("good", "new")
        for serial in (new, victim):
            attempts = [e["attempt"] for e in svc.failures_of(serial)]
            assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= 2, attempts  # retried
        assert any(e["failures"] for e in svc.events("tick")), "the retries' failures are in the tick lines"
        assert svc.stop() == 0
    assert openssl_check(demo, response_path(demo, victim), victim).status == "revoked"
    assert openssl_check(demo, response_path(demo, new), new).status == "good"
    assert "Traceback" not in svc.log.read_text()


def test_routine_never_re_signs_a_serial_whose_ledger_change_is_pending(tmp_path, monkeypatch, capsys):
    """Routine re-signing signs from the journal record, which states the
    old status: while a revocation is pending, routine must leave that
    serial alone. In-process, so the pending entry's backoff can be held."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    configure(demo, '\n[refresh]\nmetrics_listen = ""\n')
    assert ocspmint(demo, "run", "--quiet").returncode == 0
    victim = demo.serials["good"][0]
    key = (ISSUER, victim)
    revoke(demo, victim, "keyCompromise")
    blocked = block_store(demo, victim)
    monkeypatch.setenv("SOFTHSM2_CONF", str(demo.softhsm_conf))  # read by the spawned workers only
    journal = demo.root / "state" / "journal.sqlite"

    def record(serial: int) -> tuple:
        with sqlite3.connect(journal) as db:
            return db.execute("SELECT status, why, this_update FROM published WHERE serial = ?",
                              (f"{serial:040x}",)).fetchone()

    before = record(victim)
    with Session(load_config(demo.config), RefreshMetrics(""), lambda: False) as session:
        first = session.catch_up()
        assert [(f.stage, f.serial) for f in first.failures] == [("store", f"{victim:040x}")]
        assert session.pending[key].entry.status is Status.REVOKED and session.pending[key].failures == 1
        shutil.rmtree(blocked)  # the store could write it now, but the pending change waits for its retry
        session.pending[key].retry_at = math.inf
        with sqlite3.connect(journal) as db:
            db.execute("UPDATE published SET refresh_at = 0")  # every record's refresh time came
        tick = session.tick()
        assert tick.due == {"refresh": 2} and tick.published == 2 and not tick.failures, tick
        assert record(victim) == before and not blocked.exists(), "routine re-signed a serial with a pending change"
        session.pending[key].retry_at = 0.0
        tick = session.tick()
        assert tick.due == {"changed": 1} and tick.published == 1 and not tick.failures, tick
        assert key not in session.pending
    assert record(victim)[:2] == ("revoked", "changed")
    assert openssl_check(demo, blocked, victim).status == "revoked"
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [failure] = [e for e in logged if e["event"] == "failure"]
    assert failure["serial"] == f"{victim:040x}" and failure["attempt"] == 1 and failure["retry_in"] == 1.0


# 2. One signer pool per Session ---------------------------------------------


def test_one_signer_pool_per_config_and_a_failed_probe_exits_cleanly(tmp_path, shim):
    demo = build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)
    use_module(demo, shim)
    configure(demo, '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    with refresh(demo, tmp_path / "refresh.log", {"P11FAULT_MODULE": SOFTHSM}) as svc:
        wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        assert len(svc.events("signer_started")) == 1 and svc.signer_workers() == 1
        svc.proc.send_signal(signal.SIGHUP)  # a reload replaces the pool, it does not add one
        wait_for(lambda: len(svc.events("caught_up")) == 2, "the reload's catch-up pass")
        assert len(svc.events("signer_started")) == 2 and svc.signer_workers() == 1
        assert svc.stop() == 0
    # the token is gone at the first signature, the key probe: a clear exit, not a traceback
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_TOKEN_GONE_FROM": "1"}
    p = ocspmint(demo, "refresh", env=env, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and p.stderr.count('"signer_started"') == 1
    assert '"signer_failed"' in p.stderr and "probe signature failed" in p.stderr


# 3. SIGHUP with a config that parses but cannot be used ---------------------


def test_sighup_with_an_unusable_config_keeps_serving_with_the_old_one(tmp_path):
    demo = build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)
    configure(demo, '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    good = demo.config.read_text()
    (demo.root / "bad-pin.txt").write_text("00000000\n")
    (demo.root / "bad-pin.txt").chmod(0o600)
    (demo.root / "afile").write_text("")
    bad = [
        (good.replace('pin_file = "pin.txt"', 'pin_file = "bad-pin.txt"'), "CKR_PIN_INCORRECT"),
        (good.replace("object=ocsp-responder;", "object=ocsp-responder-2027;"), "ocsp-responder-2027"),
        (good.replace('state_dir = "state"', 'state_dir = "afile"'), "state_dir changed"),
        (good + "\nnot_a_key = 1\n", "not_a_key"),
    ]
    assert all(text != good for text, _ in bad)
    with refresh(demo, tmp_path / "refresh.log") as svc:
        wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        for n, (text, why) in enumerate(bad, 1):
            demo.config.write_text(text)
            svc.proc.send_signal(signal.SIGHUP)
            failed = wait_for(lambda: len(svc.events("reload_failed")) == n and svc.events("reload_failed"),
                              f"reload {n} to be refused")
            assert why in failed[-1]["error"], failed[-1]
            assert svc.proc.poll() is None and svc.signer_workers() == 1  # the new pool was closed, the old one kept
        # the old config still serves
        serial = issue(demo, precert=True)
        wait_for(lambda: svc.row(serial) == ("good", "new"), "a precertificate published after the refused reloads")
        assert not svc.events("reloaded") and len(svc.events("caught_up")) == 1
        demo.config.write_text(good)
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: svc.events("reloaded") and len(svc.events("caught_up")) == 2, "the good reload")
        assert svc.stop() == 0
    text = svc.log.read_text()
    assert "Traceback" not in text and '"signer_failed"' not in text


# 4. Purges: reported, never delaying signing, never lost --------------------


class _Ack(http.server.BaseHTTPRequestHandler):
    """A purge target that acknowledges every BAN."""

    def do_BAN(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_purges_to_a_dead_target_are_reported_never_delay_signing_and_stay_queued(tmp_path):
    """Target "dead" refuses connections (later it comes up); target "hang"
    accepts them and never answers (each attempt waits its 30 s timeout).
    Before, purges ran inside the tick: a new precertificate then waited
    for 3 × 30 s."""
    demo = build_demo(tmp_path / "demo", certs=3, precerts=0, revoke=0)
    dead, metrics = free_port(), free_port()
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    configure(demo, f'\n[refresh]\ntick = "PT0.5S"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
                    f'\n[[purge]]\nname = "dead"\ntype = "http"\nurls = ["http://127.0.0.1:{dead}"]\n'
                    f'\n[[purge]]\nname = "hang"\ntype = "http"\nurls = ["http://127.0.0.1:{hang.getsockname()[1]}"]\n'
                    'timeout = "PT30S"\n')
    server = None
    try:
        with refresh(demo, tmp_path / "refresh.log", metrics=metrics) as svc:
            wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
            victim = demo.serials["good"][0]
            revoke(demo, victim, "keyCompromise")
            wait_for(lambda: svc.row(victim) == ("revoked", "changed"), "the revocation")
            [pending] = wait_for(lambda: [e for e in svc.events("purge_pending") if e["target"] == "dead"],
                                 "purge_pending for the dead target")
            assert pending["pending"] == 1 and "refused" in pending["error"], pending
            assert svc.metrics()['ocspmint_purges_pending{target="dead"}'] == 1
            wait_for(lambda: svc.journal("SELECT attempts FROM purges WHERE target = 'dead'")[0][0] >= 2,
                     "a second attempt at the dead target (its backoff is 1 s)")
            # the hung target is still in its first attempt: signing goes on meanwhile
            serial = issue(demo, precert=True)
            wait_for(lambda: svc.row(serial) == ("good", "new"), "a new precertificate while purges hang", timeout=20)
            assert not [e for e in svc.events("purge_pending") if e["target"] == "hang"]
            assert svc.journal("SELECT target FROM purges ORDER BY target") == [("dead",), ("hang",)]
            # the dead target comes up: its purge goes out at its next attempt; the hung one stays queued
            server = http.server.ThreadingHTTPServer(("127.0.0.1", dead), _Ack)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            wait_for(lambda: svc.events("purge_recovered"), "the dead target's purge to go out", timeout=90)
            assert svc.journal("SELECT target FROM purges") == [("hang",)]
            assert svc.metrics()['ocspmint_purges_pending{target="dead"}'] == 0
            # one line for its first failed attempt: the later ones came within the minute
            assert len([e for e in svc.events("purge_pending") if e["target"] == "dead"]) == 1
            assert all(e["failures"] == 0 for e in svc.events("tick"))  # purging is not signing
            assert svc.stop() == 0  # promptly, though a purge is still waiting for "hang"
        assert "Traceback" not in svc.log.read_text()
    finally:
        hang.close()
        if server is not None:
            server.shutdown()
            server.server_close()


# 5. Backoff per pending change; each failure counted once -------------------


def test_a_pending_change_backs_off_on_its_own_and_every_failure_is_counted_once(tmp_path):
    """A new precertificate whose response the store cannot write: retried
    1, 2, 4, 8 s after its failures, however many other changes publish
    meanwhile, and across a SIGHUP reload (whose catch-up pass tries it at
    once); once the store can write it, it is published. Then a clock
    behind the journal's: one ``clock`` event and one failure per tick. The
    failure counter matches the failure lines, stage by stage."""
    demo = build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)
    metrics = free_port()
    configure(demo, f'\n[refresh]\ntick = "PT0.5S"\nmetrics_listen = "127.0.0.1:{metrics}"\n')
    stuck = 0x7E57_0000_0000_0000_0000_0000_0000_0001
    with refresh(demo, tmp_path / "refresh.log", metrics=metrics) as svc:
        wait_for(lambda: svc.events("caught_up"), "the catch-up pass")
        blocked = block_store(demo, stuck)
        issue(demo, serial=stuck, precert=True)
        wait_for(lambda: svc.failures_of(stuck), "the first failure")
        other = issue(demo, precert=True)  # published at once, while the stuck one backs off
        wait_for(lambda: svc.row(other) == ("good", "new"), "the other precertificate")
        svc.proc.send_signal(signal.SIGHUP)  # the new Session takes the pending change over, with its backoff
        wait_for(lambda: len(svc.events("caught_up")) == 2, "the reload")
        seen = len(svc.failures_of(stuck))
        wait_for(lambda: len(svc.failures_of(stuck)) >= max(4, seen + 1), "more retries", timeout=90)
        failures = svc.failures_of(stuck)
        assert [e["stage"] for e in failures] == ["store"] * len(failures)
        assert [e["attempt"] for e in failures] == list(range(1, len(failures) + 1))
        assert [e["retry_in"] for e in failures] == [min(60.0, 2.0 ** n) for n in range(len(failures))]
        assert svc.metrics()["ocspmint_ledger_changes_pending"] == 1
        shutil.rmtree(blocked)
        wait_for(lambda: svc.row(stuck) == ("good", "new"), "the stuck precertificate, once the store can write it")
        assert svc.metrics()["ocspmint_ledger_changes_pending"] == 0
        # the clock is found behind the journal's for a while, then right again
        svc.journal("UPDATE meta SET value = cast(value AS integer) + 3600 WHERE key = 'clock'")
        wait_for(lambda: len(svc.events("clock")) >= 2, "clock events")
        svc.journal("UPDATE meta SET value = ? WHERE key = 'clock'", str(int(time.time()) - 5))
        last = issue(demo, precert=True)  # published: every earlier tick has logged its failures
        wait_for(lambda: svc.row(last) == ("good", "new"), "a precertificate after the clock is right again")
        wait_for(lambda: svc.events("tick")[-1]["published"], "the tick line of that precertificate")
        values, failed = svc.metrics(), svc.events("failure")
        assert svc.stop() == 0
    for stage in ("store", "clock"):
        assert values[f'ocspmint_failed_total{{stage="{stage}"}}'] == sum(e["stage"] == stage for e in failed), stage
    assert len(svc.events("clock")) == sum(e["stage"] == "clock" and not e["serial"] for e in failed)
    assert "Traceback" not in svc.log.read_text()



def test_purges_queued_under_a_target_no_longer_configured_are_logged_at_start(tmp_path):
    """A renamed [[purge]] target leaves its queued purges behind: `run`
    reports them, and the service says so at start (it sent nothing and
    said nothing before)."""
    demo = build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)
    configure(demo, '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    assert ocspmint(demo, "run", "--quiet").returncode == 0
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:
        db.execute("INSERT INTO purges (target, issuer, serial, queued) VALUES ('old-cdn', ?, ?, 0)",
                   (ISSUER, f"{demo.serials['good'][0]:040x}"))
    with refresh(demo, tmp_path / "refresh.log") as svc:
        [orphaned] = wait_for(lambda: svc.events("purge_orphaned"), "the purge_orphaned line")
        assert orphaned["target"] == "old-cdn" and orphaned["pending"] == 1
        assert svc.stop() == 0
