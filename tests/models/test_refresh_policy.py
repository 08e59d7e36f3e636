"""One refresh rule for `adloop learn` (wall clock) and the Globo walk (event time) (no services)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.refresh_policy import MINUTE_MS, RefreshPolicy


def test_due_by_count_or_by_time_with_something_new() -> None:
    policy = RefreshPolicy(every_events=100, every_minutes=15)
    assert policy.due(100, 0.0) == "events"
    assert policy.due(99, 14.9) is None
    assert policy.due(1, 15.0) == "time"
    assert policy.due(0, 600.0) is None  # nothing new: nothing to learn from, however long it has been


def test_a_policy_that_never_fires_is_refused() -> None:
    with pytest.raises(ValueError, match="every_events >= 1"):
        RefreshPolicy(every_events=0, every_minutes=15)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 40 * MINUTE_MS), min_size=0, max_size=200),
    every_events=st.integers(1, 30),
    every_minutes=st.sampled_from([1, 5, 15, 60]),
)
def test_event_time_intervals_are_where_the_service_would_train(gaps, every_events, every_minutes) -> None:
    """Walking the events one by one and asking `due` after each (as the service's checks do, at every
    event) closes an interval exactly where `intervals` closes it; the intervals tile the window. Events
    of one millisecond stay in one interval."""
    ts = np.cumsum(np.asarray([0, *gaps], dtype=np.int64)) + 1_000_000
    start, end = int(ts[0]) - 7, int(ts[-1]) + 3 * MINUTE_MS
    policy = RefreshPolicy(every_events, every_minutes)
    got = policy.intervals(ts, start, end)
    assert got[0][0] == start and got[-1][1] == end
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(got, [*got[1:], (end, end + 1)], strict=True))

    closes, lo, new = [], start, 0
    for t in ts.tolist():
        if t < lo:  # at the millisecond an interval closed after: it came with that interval's events
            continue
        if new and policy.due(new, (t - lo) / MINUTE_MS) == "time":  # due by time before this event came
            lo += every_minutes * MINUTE_MS
            closes.append(lo)
            new = 0
        new += 1
        if policy.due(new, (t + 1 - lo) / MINUTE_MS):
            lo = t + 1
            closes.append(lo)
            new = 0
    if new and lo + every_minutes * MINUTE_MS < end:  # the last events' time trigger, after the last event
        closes.append(lo + every_minutes * MINUTE_MS)
    assert [hi for _, hi in got[:-1]] == closes
    assert all(int(((ts >= lo) & (ts < hi - 1)).sum()) < every_events for lo, hi in got)
