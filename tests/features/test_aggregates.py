"""The pure state steps against the batch definitions, without services."""

from __future__ import annotations

from features.aggregates import (
    RECENT_IDS_N,
    UserState,
    ad_features,
    apply_user,
    prune,
    remember,
    repeat_of,
    user_features,
)
from streaming.events import Event
from tests.support import batch_features
from tests.support.events import T0, synthetic_events


def fold(events: list[Event]) -> dict[str, UserState]:
    states: dict[str, UserState] = {}
    for event in events:
        apply_user(states.setdefault(event.user_id, UserState()), event)
    return states


def test_streaming_state_equals_the_batch_recomputation() -> None:
    events = synthetic_events(3000, users=40)  # ~17 h of events: windows of 1 h and 24 h both cut
    expected = batch_features.user_features(batch_features.frame(events))
    for user, state in fold(events).items():
        batch_features.assert_features_equal(expected[user], user_features(state), user)


def test_pruning_and_a_json_round_trip_change_no_feature() -> None:
    events = synthetic_events(1500, users=10, step_ms=400_000)  # a week: buckets fall out of every window
    for state in fold(events).values():
        before = user_features(state)
        again = UserState.from_json(prune(UserState.from_json(state.to_json())).to_json())
        assert user_features(again) == before


def test_windows_follow_event_time() -> None:
    state = UserState()
    apply_user(state, Event(event_id="a", schema_version=1, event_type="page_view", user_id="u", ts=T0))
    apply_user(state, Event(event_id="b", schema_version=1, event_type="page_view", user_id="u", ts=T0 + 2 * 3_600_000))
    row = user_features(state)
    assert (row["page_view_1h"], row["page_view_24h"], row["page_view_7d"]) == (1, 2, 2)


def test_late_event_counts_in_its_own_bucket_and_does_not_move_now() -> None:
    state = UserState()
    apply_user(state, Event(event_id="a", schema_version=1, event_type="page_view", user_id="u", ts=T0 + 5 * 3_600_000))
    apply_user(state, Event(event_id="b", schema_version=1, event_type="purchase", user_id="u", ts=T0))  # 5 h late
    row = user_features(state)
    assert row["last_seen_ms"] == T0 + 5 * 3_600_000
    assert (row["purchase_1h"], row["purchase_24h"]) == (0, 1)


def test_ad_features_smooth_the_click_rate() -> None:
    hours = {str(T0 // 3_600_000): [100, 10]}
    fine = {str(T0 // 300_000): [40, 4]}
    row = ad_features(hours, fine, T0)
    assert (row["ad_impressions_1h"], row["ad_clicks_1h"], row["ad_impressions_24h"]) == (40, 4, 100)
    assert row["ad_ctr_24h"] == (10 + 1) / (100 + 20)


def test_stale_ad_counters_are_outside_every_window() -> None:
    from features.aggregates import stale_ad_counters

    now = T0
    hour, fine = now // 3_600_000, now // 300_000
    hours = {str(hour): [5, 1], str(hour - 168): [9, 9], str(hour - 167): [2, 0]}
    fines = {str(fine): [1, 0], str(fine - 12): [3, 3], str(fine - 11): [1, 1]}
    stale = stale_ad_counters(hours, fines, now)
    assert sorted(stale) == sorted([f"h:{hour - 168}:0", f"h:{hour - 168}:1", f"f:{fine - 12}:0", f"f:{fine - 12}:1"])
    kept_hours = {b: c for b, c in hours.items() if f"h:{b}:0" not in stale}
    kept_fine = {b: c for b, c in fines.items() if f"f:{b}:0" not in stale}
    assert ad_features(kept_hours, kept_fine, now) == ad_features(hours, fines, now)


def test_a_users_recent_event_ids_catch_repeats_and_stay_bounded() -> None:
    state = UserState()
    events = synthetic_events(RECENT_IDS_N + 10, users=1, seed=4)
    for event in events:
        assert repeat_of(state, event) is None
        apply_user(state, event)
        remember(state, event)
    assert len(state.recent_ids) == RECENT_IDS_N  # bounded per user, whatever the user's volume
    assert repeat_of(state, events[-1]) == "duplicate"  # remembered
    assert repeat_of(state, events[-RECENT_IDS_N]) == "duplicate"
    # forgotten: before the newest forgotten id's time it might be a repeat, so it is not applied
    assert repeat_of(state, events[0]) == "too_late" and repeat_of(state, events[8]) == "too_late"
    burst = [events[-1].model_copy(update={"event_id": f"b{i}"}) for i in range(RECENT_IDS_N + 5)]
    for event in burst:  # a burst at one time (a MIND history) is new, however long
        assert repeat_of(state, event) is None
        remember(state, event)
    later = events[-1].model_copy(update={"event_id": "new", "ts": events[-1].ts})
    assert repeat_of(state, later) is None  # a new id after the forgotten ones' time is new
    assert UserState.from_json(state.to_json()) == state  # stored and read back as is
