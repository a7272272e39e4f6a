"""The planner's Spool gives back exactly what was planned, in order,
whether it stayed in memory or spilled to its temporary file, and whether
it is read after the plan or while a planning thread still adds to it."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocspmint.model import MAX_SERIAL, Kind, LedgerEntry, Reason, Status
from ocspmint.planner import Spool

T = dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)

planned = st.builds(
    lambda issuer, serial, revoked, reason, why: (
        LedgerEntry(issuer, serial, Kind.PRECERTIFICATE if serial % 2 else Kind.CERTIFICATE, T,
                    Status.REVOKED if revoked else Status.GOOD, T - dt.timedelta(days=1) if revoked else None,
                    reason if revoked else None, f"index.txt:{serial % 97}"), why),
    st.sampled_from(["ca-a", "ca-b"]), st.integers(1, MAX_SERIAL), st.booleans(),
    st.none() | st.sampled_from([r for r in Reason if r not in (Reason.unspecified, Reason.certificateHold)]),
    st.sampled_from(["new", "changed", "refresh"]))


@settings(max_examples=60, deadline=None)
@given(items=st.lists(planned, max_size=40), memory=st.integers(0, 50))
def test_entries_round_trip_in_memory_and_spilled(tmp_path_factory, items, memory) -> None:
    with Spool(str(tmp_path_factory.mktemp("spool")), memory_entries=memory) as spool:
        for p in items:
            spool.add(p)
        spool.finish()
        assert len(spool) == len(items) and spool.finished
        assert spool.spilled == (len(items) > memory)
        assert list(spool.entries()) == items


def _entry(n: int) -> tuple[LedgerEntry, str]:
    return LedgerEntry("ca-a", n + 1, Kind.CERTIFICATE, T, Status.GOOD, None, None, f"ledger:{n}"), "new"


@pytest.mark.parametrize("memory", [0, 700, 10_000])
def test_a_reader_gets_every_entry_in_order_while_the_plan_still_adds(tmp_path, memory) -> None:
    """A planning thread adds 5,000 entries (pausing, so the reader catches
    up and is told "nothing for now" with None); the reader gets them all,
    once each, in order, spilled past ``memory`` or not, reading the
    temporary file a little at a time."""
    items = [_entry(n) for n in range(5000)]
    with Spool(str(tmp_path), memory_entries=memory) as spool:
        spool.READ_BYTES = 997  # lines split across reads of the temporary file
        pause = threading.Event()

        def plan() -> None:
            for n, p in enumerate(items):
                spool.add(p)
                if n % 1000 == 999:
                    pause.wait(0.05)
            spool.finish()

        planner = threading.Thread(target=plan)
        planner.start()
        got = list(spool.entries(wait=0.01))
        planner.join()
    assert [p for p in got if p is not None] == items
    assert None in got  # the reader waited for the plan at least once


def test_a_failed_plan_raises_its_error_in_the_reader(tmp_path) -> None:
    """Nothing of a failed plan is published, so the reader does not read
    it to the end: its next look at the spool raises the plan's exception."""
    with Spool(str(tmp_path), memory_entries=10) as spool:
        for n in range(300):
            spool.add(_entry(n))
        reader = spool.entries()
        assert next(reader) == _entry(0)
        spool.fail(RuntimeError("ledger unreadable"))
        with pytest.raises(RuntimeError, match="ledger unreadable"):
            list(reader)
        assert not spool.finished
