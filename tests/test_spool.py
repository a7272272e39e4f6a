"""The planner's Spool gives back exactly what was planned, in order,
whether it stayed in memory or spilled to its temporary file."""

from __future__ import annotations

import datetime as dt

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
@given(items=st.lists(planned, max_size=40), memory=st.integers(0, 50), drop=st.sets(st.integers(0, 39)))
def test_entries_round_trip_in_memory_and_spilled(tmp_path_factory, items, memory, drop) -> None:
    excluded = {(items[i][0].issuer, items[i][0].serial) for i in drop if i < len(items)}
    with Spool(str(tmp_path_factory.mktemp("spool")), memory_entries=memory) as spool:
        for p in items:
            spool.add(p)
        assert len(spool) == len(items)
        assert spool.spilled == (len(items) > memory)
        assert list(spool.entries(excluded)) == [p for p in items if (p[0].issuer, p[0].serial) not in excluded]
