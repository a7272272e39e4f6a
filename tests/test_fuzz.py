"""The atheris fuzz target of the OCSP request parser (fuzz/fuzz_request.py)
runs for a fixed time from the seed corpus without finding anything: no
input makes parse_request or parse_get_path raise anything but
RequestError, and GET paths agree with the DER they encode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
SECONDS = 10


def test_fuzz_target_runs_clean_for_a_fixed_time(tmp_path: Path) -> None:
    seeds = sorted(p for p in (FUZZ / "corpus").iterdir() if p.is_file())
    assert len(seeds) >= 20, "seed corpus missing: python fuzz/make_corpus.py fuzz/corpus"
    cmd = [sys.executable, str(FUZZ / "fuzz_request.py"), str(tmp_path / "corpus"), str(FUZZ / "corpus"),
           f"-max_total_time={SECONDS}", f"-artifact_prefix={tmp_path}/"]
    (tmp_path / "corpus").mkdir()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 60)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert f"seed corpus: files: {len(seeds)} " in out, out[:3000]
    inited = re.search(r"INITED cov: (\d+)", out)
    assert inited and int(inited.group(1)) > 40, "the parser is not instrumented: " + out[:3000]
    done = re.search(r"^Done (\d+) runs in (\d+) second", out, re.M)
    assert done, out[-3000:]
    assert int(done.group(1)) >= 1000 and int(done.group(2)) >= SECONDS, done.group(0)
    assert list(tmp_path.glob("crash-*")) == []
