"""`ocspmint reissue` on real `openssl ca` databases and SoftHSM2: the three
incident cases the issue names (a new delegated responder, a batch of
keyCompromise revocations, an incident population from a serial list),
the dry run, the rate limit and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from cdn import free_port, serve
from e2e import BIN, ocspmint, openssl_check, response_path, run_json
from ocspmint.demo import Demo, build_demo, new_responder, revoke
from ocspmint.issuer import load_certificate
from cryptography.x509 import ocsp

PURGE = '\n[[purge]]\nname = "origin"\ntype = "http"\nurls = ["{origin}"]\n'


def journal(demo: Demo, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(demo.root / "state" / "journal.sqlite", timeout=10) as db:
        return db.execute(sql, args).fetchall()


def produced(demo: Demo) -> dict[str, int]:
    """producedAt (Unix s) of every journaled response, by serial hex."""
    return dict(journal(demo, "SELECT serial, produced_at FROM published"))


def reissue(demo: Demo, *args: str) -> tuple[int, dict]:
    p = ocspmint(demo, "reissue", "--json", "--quiet", *args)
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout)


def serial_file(tmp: Path, serials: list[int]) -> Path:
    path = tmp / "serials.txt"
    path.write_text("# incident population\n" + "".join(f"{s:x}\n" for s in serials))
    return path


def published(demo: Demo) -> int:
    code, summary = run_json(demo)
    assert code == 0, summary
    return summary["published"]


def test_dry_run_estimates_at_the_measured_rate_and_signs_nothing(tmp_path):
    demo = build_demo(tmp_path, certs=8, precerts=2, revoke=1)
    published(demo)
    before = produced(demo)
    p = ocspmint(demo, "reissue", "--all", "--reason", "rehearsal", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "would re-sign, publish and verify 10 {'forced': 10}" in p.stdout and "responses/s" in p.stdout, p.stdout
    assert "Nothing was signed" in p.stdout
    assert produced(demo) == before


def test_dry_run_over_a_bad_ledger_says_its_counts_are_incomplete_and_exits_1(tmp_path):
    """Before, a ledger the run would stop on gave "0 entries selected",
    exit 0: an estimate that silently left the whole population out."""
    demo = build_demo(tmp_path, certs=3, precerts=0, revoke=0)
    published(demo)
    index = demo.root / "ca" / "index.txt"
    index.write_text("Q" + index.read_text()[1:])  # line 1: an unknown status letter
    p = ocspmint(demo, "reissue", "--all", "--reason", "rehearsal", "--dry-run")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "INCOMPLETE: 1 ledger failure(s)" in p.stdout and f"{index}:1: unknown status letter 'Q'" in p.stdout


def test_an_empty_selection_is_refused(tmp_path):
    demo = build_demo(tmp_path, certs=2, precerts=0, revoke=0)
    p = ocspmint(demo, "reissue", "--reason", "oops")
    assert p.returncode == 2 and "nothing selected" in p.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("0a1b\nnot-hex\n")
    p = ocspmint(demo, "reissue", "--reason", "oops", "--serials", str(bad))
    assert p.returncode == 2 and f"{bad}:2" in p.stderr


def ask(demo: Demo, origin: str, serial: int) -> str:
    """`openssl ocsp -url` against ``origin``, its output checked verified."""
    p = subprocess.run(["openssl", "ocsp", "-url", origin, "-issuer", str(demo.issuing_ca), "-CAfile",
                        str(demo.root_ca), "-no_nonce", "-serial", f"0x{serial:x}"], capture_output=True, text=True,
                       timeout=60)
    assert "Response verify OK" in p.stdout + p.stderr, p.stdout + p.stderr
    return p.stdout


def test_new_delegated_responder_re_signs_every_response_and_purges(tmp_path):
    demo = build_demo(tmp_path / "demo", certs=6, precerts=2, revoke=1)
    total = published(demo)
    cert = new_responder(demo, "responder-2")
    config = demo.config.read_text().replace("object=ocsp-responder", "object=responder-2")
    demo.config.write_text(config.replace('cert = "ca/responder.pem"', f'cert = "{cert}"'))
    good = demo.serials["good"][0]
    with serve(demo.config, tmp_path, free_port(), demo.env()) as origin:
        # the origin, started with the new signer, still serves what the old one signed (a rollover)
        assert f"0x{good:x}: good" in ask(demo, origin, good)
        demo.config.write_text(demo.config.read_text() + PURGE.format(origin=origin))
        code, out = reissue(demo, "--issuer", "issuing-ca", "--reason", "responder key compromise")
        assert f"0x{good:x}: good" in ask(demo, origin, good)
    assert code == 0 and out["ok"], out
    assert out["summary"]["published"] == total and out["summary"]["purges"]["origin"] == {"sent": total, "pending": 0, "error": ""}
    assert out["audit"]["findings"] == [] and out["audit"]["checked"] == {"store": total}, out["audit"]
    new_der = load_certificate(str(cert))
    for serial in demo.serials["good"] + demo.serials["precert"]:
        path = response_path(demo, serial)
        assert openssl_check(demo, path, serial).verified
        assert ocsp.load_der_ocsp_response(path.read_bytes()).certificates == [new_der]
    assert journal(demo, "SELECT DISTINCT why FROM published") == [(f"reissue {out['job']}: responder key compromise",)]


def test_batch_of_keycompromise_revocations(tmp_path):
    demo = build_demo(tmp_path / "demo", certs=8, precerts=0, revoke=0)
    published(demo)
    before = produced(demo)
    batch = demo.serials["good"][:3]
    for s in batch:
        revoke(demo, s, "keyCompromise")
    time.sleep(1)  # a re-signed response gets a later producedAt
    code, out = reissue(demo, "--serials", str(serial_file(tmp_path, batch)), "--reason", "keyCompromise batch")
    assert code == 0 and out["ok"], out
    assert out["summary"]["published"] == 3 and out["summary"]["due"] == {"changed": 3}
    for s in batch:
        view = openssl_check(demo, response_path(demo, s), s)
        assert (view.status, view.reason) == ("revoked", "keyCompromise")
    after = produced(demo)
    assert [k for k in after if after[k] != before[k]] == sorted(f"{s:040x}" for s in batch)


def test_incident_population_resumes_after_sigkill_and_respects_the_rate(tmp_path):
    demo = build_demo(tmp_path / "demo", certs=24, precerts=0, revoke=0)
    published(demo)
    population = demo.serials["good"][:20]
    listed = serial_file(tmp_path, population)
    time.sleep(1)
    args = [str(BIN / "ocspmint"), "reissue", "--config", str(demo.config), "--serials", str(listed),
            "--reason", "incident 42", "--rate", "4", "--quiet"]
    proc = subprocess.Popen(args, env=demo.env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_first = journal(demo, "SELECT serial, produced_at FROM published WHERE why = 'reissue 1: incident 42'")
    assert 1 <= len(done_first) < 20, "the rate limit (4/s) should have stopped short of 20 in 3.5 s"
    assert journal(demo, "SELECT id, finished FROM jobs") == [(1, None)]
    code, out = reissue(demo, "--serials", str(listed), "--reason", "incident 42")
    assert code == 0 and out["ok"] and out["resumed"] and out["job"] == 1, out
    assert out["summary"]["published"] == 20 - len(done_first)
    rows = dict(journal(demo, "SELECT serial, produced_at FROM published WHERE why = 'reissue 1: incident 42'"))
    assert sorted(rows) == sorted(f"{s:040x}" for s in population)
    assert all(rows[s] == t for s, t in done_first), "a response re-signed before the kill was signed again"
    assert journal(demo, "SELECT count(*) FROM jobs WHERE finished IS NOT NULL") == [(1,)]
    assert ocspmint(demo, "verify").returncode == 0
