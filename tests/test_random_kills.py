"""SIGKILL at 20 random points of `ocspmint run`, `refresh` and `reissue`
(the process group: signer workers die too), with the CA revoking serials
between kills; then one run and the resumed reissue finish, and every due
response is published, verified, and byte-equal to what the journal says."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time

from e2e import BIN, ocspmint, response_path, run_json
from ocspmint.demo import build_demo
from test_faults import synthetic_ledger

TOTAL = 3000
KILLS = 20  # kills that land while the process works (a run with little due may finish first)


def revoke_some(db_path, rng: random.Random, count: int) -> None:
    """The CA revokes ``count`` random good serials (direct SQL, as an issuance system would)."""
    with sqlite3.connect(db_path) as db:
        good = [s for (s,) in db.execute("SELECT serial FROM entries WHERE status = 'good'")]
        for serial in rng.sample(good, count):
            db.execute("UPDATE entries SET status = 'revoked', revoked_at = ?, reason = 1 WHERE serial = ?",
                       (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), serial))


def test_sigkill_at_20_random_points_of_run_refresh_and_reissue_loses_nothing(tmp_path):
    seed = int(os.environ.get("OCSPMINT_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    demo = build_demo(tmp_path, certs=1, precerts=0, revoke=0)
    synthetic_ledger(demo, TOTAL)
    demo.config.write_text(demo.config.read_text().replace("workers = 2", "workers = 2\nbatch_size = 64")
                           + '\n[refresh]\ntick = "PT0.2S"\nmetrics_listen = ""\n')
    ledger = demo.root / "ledger.sqlite"
    commands = {
        "run": ["run", "--quiet"],
        "refresh": ["refresh"],
        "reissue": ["reissue", "--all", "--reason", "incident", "--rate", "1500", "--quiet"],
    }
    hit = n = 0
    while hit < KILLS and n < 3 * KILLS:
        name = ("run", "refresh", "reissue")[n % 3]
        cmd = [str(BIN / "ocspmint"), *commands[name], "--config", str(demo.config)]
        proc = subprocess.Popen(cmd, env=demo.env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 2.5))
        if proc.poll() is None:
            hit += 1
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        revoke_some(ledger, rng, 3)
        n += 1
    assert hit == KILLS, f"only {hit} kills landed while the process worked (seed {seed})"

    code, summary = run_json(demo)
    assert code == 0 and summary["ok"], (seed, summary)
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:  # the last reissue may have finished unkilled
        interrupted = db.execute("SELECT count(*) FROM jobs WHERE finished IS NULL").fetchone()[0]
    p = ocspmint(demo, "reissue", "--all", "--reason", "incident", "--json", "--quiet")
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["ok"] and out["resumed"] == (interrupted > 0), (seed, interrupted, out)

    verify = ocspmint(demo, "verify", "--json")
    assert verify.returncode == 0, (seed, verify.stdout[-2000:])
    assert json.loads(verify.stdout)["checked"] == TOTAL
    with sqlite3.connect(demo.root / "state" / "journal.sqlite") as db:
        rows = db.execute("SELECT serial, status, sha256 FROM published").fetchall()
        pending = db.execute("SELECT count(*) FROM jobs WHERE finished IS NULL").fetchone()[0]
    with sqlite3.connect(ledger) as db:
        revoked = {s for (s,) in db.execute("SELECT serial FROM entries WHERE status = 'revoked'")}
    assert len(rows) == TOTAL and pending == 0
    assert {s for s, status, _ in rows if status == "revoked"} == revoked, f"seed {seed}"
    for serial, _, digest in rows:
        assert hashlib.sha256(response_path(demo, int(serial, 16)).read_bytes()).digest() == digest, (seed, serial)
