"""One ocspmint per state folder (``ocspmint.statelock``), and the journal
and store errors that used to end a command with a traceback.

Real components: the demo CA and its SoftHSM2 token, the CLI in child
processes, the p11fault shim to slow signing down so two runs overlap, a
tmpfs for a full disk. Every refusal is one line on stderr and exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from e2e import BIN, ocspmint, run_json
from faultkit import SOFTHSM, assert_journal_matches_store, edit_config, file_objects, use_module, verify_clean, wait_for
from ocspmint.demo import Demo, build_demo, issue

BUSY = re.compile(r"^ocspmint: (?P<state>\S+): in use by another ocspmint \(pid (?P<pid>\d+), (?P<command>[^)]+)\); .+$")
REFRESH = '\n[refresh]\ntick = "PT0.5S"\nmetrics_listen = ""\n'


def start(demo: Demo, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """``ocspmint ARGS --config`` in a session of its own (killpg reaches its signer workers)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([str(BIN / "ocspmint"), *args, "--config", str(demo.config)], env={**demo.env(), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the service (it stops its own workers), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def reap(pgid: int) -> None:
    """Kill what is left of a process group (orphaned signer workers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def refreshing(tmp_path) -> Iterator[tuple[Demo, subprocess.Popen, Path]]:
    """A demo with `ocspmint refresh` running on it, caught up."""
    demo = build_demo(tmp_path / "demo", certs=4, precerts=1, revoke=1)
    demo.config.write_text(demo.config.read_text() + REFRESH)
    log = tmp_path / "refresh.log"
    proc = start(demo, "refresh", log=log)
    try:
        wait_for(lambda: b'"caught_up"' in log.read_bytes() or proc.poll() is not None, "the catch-up pass")
        assert proc.poll() is None, log.read_text()
        yield demo, proc, log
    finally:
        stop(proc)
        reap(proc.pid)


def test_a_command_that_writes_refuses_a_state_folder_in_use_naming_the_holder(refreshing):
    demo, proc, log = refreshing
    state = demo.root / "state"
    assert (state / "lock").read_text() == f"{proc.pid} refresh\n"
    for args in (["run", "--quiet"], ["reissue", "--all", "--reason", "incident", "--quiet"], ["audit", "--fix", "--quiet"],
                 ["reissue", "--clock-was-fast", "--reason", "ntp", "--quiet"], ["refresh"]):
        started = time.monotonic()
        p = ocspmint(demo, *args, timeout=60)
        assert p.returncode == 2 and p.stdout == "", (args, p.stdout, p.stderr)
        assert time.monotonic() - started < 20, f"{args} waited for the lock"
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and (m := BUSY.match(lines[0])), (args, p.stderr)
        assert (m["state"], int(m["pid"]), m["command"]) == (str(state), proc.pid, "refresh"), lines[0]
    # read-only commands do not need the lock
    dry = ocspmint(demo, "reissue", "--all", "--reason", "estimate", "--dry-run")
    assert dry.returncode == 0 and "Nothing was signed" in dry.stdout, dry.stderr
    assert ocspmint(demo, "audit", "--quiet").returncode == 0
    assert verify_clean(demo) == 5
    assert proc.poll() is None, "the refused commands disturbed the service"
    with closing(sqlite3.connect(state / "journal.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,), "a refused reissue recorded a job"

    stop(proc)
    assert proc.returncode == 0, log.read_text()
    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == 0, summary
    p = ocspmint(demo, "reissue", "--all", "--reason", "incident", "--quiet")
    assert p.returncode == 0 and "REISSUE OK" in p.stdout, p.stdout + p.stderr


def test_two_runs_at_once_one_publishes_and_the_other_refuses(tmp_path, shim):
    """The reviewers' case: both used to sign everything, and journal rows
    ended naming bytes the other run had since stored."""
    demo = build_demo(tmp_path, certs=30, precerts=2, revoke=2)
    use_module(demo, shim)
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "50000"}  # ~1 s of signing: the runs overlap
    cmd = [str(BIN / "ocspmint"), "run", "--json", "--quiet", "--config", str(demo.config)]
    procs = [subprocess.Popen(cmd, env={**demo.env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    finally:
        for p in procs:
            reap(p.pid)
    results.sort(key=lambda r: r[3])
    (winner, out, err, code), (_, out2, err2, code2) = results
    assert (code, code2) == (0, 2), results
    assert json.loads(out)["published"] == 32 and "Traceback" not in err, err
    lines = err2.splitlines()
    assert out2 == "" and len(lines) == 1 and (m := BUSY.match(lines[0])), err2
    assert (int(m["pid"]), m["command"]) == (winner, "run")
    objects = file_objects(demo)
    assert len(assert_journal_matches_store(demo, objects.get)) == len(objects) == 32
    assert verify_clean(demo, env=env) == 32


CHILD = textwrap.dedent("""
    import multiprocessing, subprocess, sys, time
    from ocspmint.statelock import acquire

    if __name__ == "__main__":
        fd = acquire(sys.argv[1], "run")
        sleeper = subprocess.Popen(["sleep", "120"], close_fds=False)  # inherits every inheritable descriptor
        worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,))  # as the signer workers
        worker.start()
        print(sleeper.pid, worker.pid, flush=True)
        time.sleep(120)
""")


def test_the_lock_dies_with_its_holder_even_while_its_children_live(tmp_path):
    """SIGKILL of the holder alone releases the lock: no child it started
    (a spawned worker, a subprocess given close_fds=False) inherited it."""
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    state = demo.root / "state"
    state.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", CHILD, str(state)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        children = [int(pid) for pid in holder.stdout.readline().split()]
        assert len(children) == 2
        p = ocspmint(demo, "run", "--quiet")
        assert p.returncode == 2 and f"(pid {holder.pid}, run)" in p.stderr, p.stderr
        holder.kill()  # the holder only, not its process group
        holder.wait()
        for pid in children:
            os.kill(pid, 0)  # still alive
        code, summary = run_json(demo)
        assert code == 0 and summary["published"] == 2, summary
    finally:
        reap(holder.pid)


def test_a_run_killed_by_sigkill_leaves_no_lock_behind(tmp_path, shim):
    demo = build_demo(tmp_path, certs=20, precerts=0, revoke=0)
    use_module(demo, shim)
    env = {"P11FAULT_MODULE": SOFTHSM, "P11FAULT_SIGN_DELAY_US": "100000"}
    journal = demo.root / "state" / "journal.sqlite"
    proc = start(demo, "run", "--quiet", env=env)
    try:
        wait_for(journal.exists, "the run to open its journal")
        time.sleep(0.5)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)  # the run alone: its signer workers may outlive it for a moment
        proc.wait()
        code, summary = run_json(demo, env=env)
        assert code == 0 and summary["ok"], summary
    finally:
        reap(proc.pid)
    assert len(assert_journal_matches_store(demo, file_objects(demo).get)) == 20


def test_a_journal_locked_by_another_program_stops_refresh_with_one_line(refreshing):
    """An sqlite3 shell (here: a connection of this test) holds the
    journal's write lock longer than the busy timeout: refresh stops with
    exit 2 and one line naming the journal, not a traceback; the next run
    goes on."""
    demo, proc, log = refreshing
    path = demo.root / "state" / "journal.sqlite"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        issue(demo, precert=True)  # work for the next tick; the clock check writes every tick anyway
        try:
            proc.wait(40)
        finally:
            db.execute("ROLLBACK")
    out = log.read_text()
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.splitlines()[-1] == (f"ocspmint: {path}: journal write failed: database is locked: another program kept the "
                                    "journal locked for more than 5 s (an sqlite3 shell, a backup?); end it, then run again")
    code, summary = run_json(demo)
    assert code == 0 and summary["published"] == 1, summary
    assert len(assert_journal_matches_store(demo, file_objects(demo).get)) == 6


def test_a_journal_on_a_full_disk_is_one_line_and_the_next_run_resumes(tmp_path, tmpfs):
    demo = build_demo(tmp_path / "demo", certs=3, precerts=1, revoke=0)
    disk = tmp_path / "disk"
    tmpfs(disk, "size=2m")
    edit_config(demo, 'state_dir = "state"', f'state_dir = "{disk}/state"')
    assert run_json(demo)[0] == 0
    for wal in (disk / "state").glob("journal.sqlite-*"):
        wal.unlink()
    free = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 44 * 1024))  # ~44 KiB left for the journal
    issue(demo, precert=True)
    issue(demo)
    p = ocspmint(demo, "run", "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert p.stderr.splitlines() == [f"ocspmint: {disk}/state/journal.sqlite: journal write failed: database or disk is full: "
                                     "free space on its file system, then run again"], p.stderr
    filler.unlink()
    code, summary = run_json(demo)
    assert code == 0 and summary["due"] == {"new": 2} and summary["published"] == 2, summary
    objects = {key.rsplit("/", 1)[1]: data for key, data in file_objects(demo).items()}
    with closing(sqlite3.connect(disk / "state" / "journal.sqlite")) as db:
        rows = dict(db.execute("SELECT serial, sha256 FROM published"))
    assert len(rows) == len(objects) == 6
    assert all(hashlib.sha256(objects[serial]).digest() == digest for serial, digest in rows.items())


def test_a_store_that_cannot_be_opened_is_one_line_exit_2(tmp_path):
    """An S3 store and no AWS credentials anywhere: `run`, `reissue` and
    `refresh` stop at start naming the store, no traceback."""
    demo = build_demo(tmp_path / "demo", certs=2, precerts=0, revoke=0)
    edit_config(demo, 'url = "file:responses"', 'url = "s3://bucket/ocsp"\nendpoint = "http://127.0.0.1:9"')
    env = {k: v for k, v in demo.env().items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    for args in (["run", "--quiet"], ["reissue", "--all", "--reason", "r", "--quiet"], ["refresh"]):
        p = subprocess.run([str(BIN / "ocspmint"), *args, "--config", str(demo.config)], env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr[-3000:])
        assert p.stderr.splitlines() == ["ocspmint: s3://bucket/ocsp: cannot open the store: no AWS credentials from the "
                                         "environment or shared config: ValueError"], (args, p.stderr)
