"""`refresh.routine_rate` caps routine re-signing. Set below what the
population needs, the routine falls behind without a word until responses
expire; the catch-up pass now logs `routine_rate_low` with the numbers.
Real components: `openssl ca` index.txt, SoftHSM2, the file store, the
journal and the refresh Session.
"""

from __future__ import annotations

import json
import math

import pytest

from ocspmint.demo import build_demo
from test_absent_sweep import INDEX, _session, with_sources
from test_incremental import run


@pytest.mark.parametrize("rate, warned", [(1e-6, True), (1.0, False), (0.0, False)])
def test_catch_up_logs_a_routine_rate_too_low_for_the_population(tmp_path, monkeypatch, capsys, rate, warned):
    demo = build_demo(tmp_path, certs=3, precerts=1, revoke=1)
    config = with_sources(demo, INDEX, f'[refresh]\nmetrics_listen = ""\nroutine_rate = {rate}\n')
    assert run(demo, config)["ok"]
    capsys.readouterr()
    with _session(demo, config, monkeypatch) as session:
        summary = session.catch_up()
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    low = [e for e in events if e["event"] == "routine_rate_low"]
    population = summary.ledger_entries - summary.expired
    assert population == summary.up_to_date > 0  # all published by the run before
    if warned:
        (event,) = low
        assert event["routine_rate"] == rate and event["entries"] == population
        assert event["needed"] == pytest.approx(population * 2 * math.log(2) / (3 * 86400), rel=1e-2)
    else:
        assert low == []
