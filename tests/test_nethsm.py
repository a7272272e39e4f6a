"""`ocspmint run` against the simulated network HSM (tests/nethsm.py):
SoftHSM2 behind `p11-kit server`, reached through p11-kit-client.so, with a
small signing delay and a slot limit (the p11fault shim in the server)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from e2e import openssl_check, response_path, run_json
from nethsm import P11KIT_CLIENT, SOFTHSM_MODULE, available, nethsm
from ocspmint.demo import RESPONDER_LABEL, TOKEN_LABEL, build_demo

pytestmark = pytest.mark.skipif(available() is not None, reason=f"simulated HSM: {available()}")

ROOT = Path(__file__).resolve().parents[1]


def test_run_signs_every_response_through_p11kit_client(tmp_path):
    demo = build_demo(tmp_path / "demo", certs=4, precerts=2, revoke=1)
    text = demo.config.read_text()
    assert f'module = "{SOFTHSM_MODULE}"' in text
    demo.config.write_text(text.replace(f'module = "{SOFTHSM_MODULE}"', f'module = "{P11KIT_CLIENT}"'))
    with nethsm(tmp_path / "hsm", demo.softhsm_conf, token=TOKEN_LABEL, latency_us=1000, slots=2) as hsm:
        assert hsm.module == P11KIT_CLIENT and hsm.capacity == 2000
        # the client reaches SoftHSM2 only through the server's socket
        code, summary = run_json(demo, env={**hsm.env, "SOFTHSM2_CONF": "/nonexistent/softhsm2.conf"})
    unexpired = set(demo.serials["good"]) | set(demo.serials["revoked"]) | set(demo.serials["precert"])
    assert code == 0 and summary["ok"] is True, summary
    assert summary["published"] == summary["verified"] == len(unexpired)
    for serial in unexpired:
        view = openssl_check(demo, response_path(demo, serial), serial)
        assert view.verified, view.text
        assert view.status == ("revoked" if serial in demo.revoked else "good"), view.text


@pytest.mark.parametrize("transport", ["p11kit", "shim"])
def test_c_sign_loop_through_the_simulated_hsm(tmp_path, transport):
    """The bench harness path: the raw C loop, 2 processes x 2 sessions."""
    spec = importlib.util.spec_from_file_location("p11loop_build", ROOT / "bench" / "p11loop" / "build.py")
    assert spec is not None and spec.loader is not None
    p11loop_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(p11loop_build)
    loop = p11loop_build.build_loop(tmp_path / "loop")
    demo = build_demo(tmp_path / "demo", certs=1, precerts=0, revoke=0)
    pin = demo.pin_file.read_text().strip()
    with nethsm(tmp_path / "hsm", demo.softhsm_conf, latency_us=500, slots=2, transport=transport) as hsm:
        env = hsm.client_env({"PATH": os.environ["PATH"], "LOOP_PIN": pin})
        p = subprocess.run([str(loop), hsm.module, TOKEN_LABEL, RESPONDER_LABEL, "ecdsa", "--pin-env", "LOOP_PIN",
                            "--processes", "2", "--sessions", "2", "--count", "40", "--warmup", "0"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert pin not in p.stdout + p.stderr
    result = json.loads(p.stdout)
    assert result["signatures"] == 40 and result["processes"] == 2 and result["sessions"] == 2
