"""hypothesis on the event parser: any bytes give an Event or an InvalidEvent with a reason, never another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.events import MAX_EVENT_BYTES, Event, EventType, InvalidEvent, parse_event

REASONS = {"oversized", "not_utf8", "invalid_json", "unknown_event_type", "schema"}
BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["event_id", "schema_version", "event_type", "user_id", "ts", "item_id", "category", "price", "ad_id",
          "request_id", "arm", "propensity", "position", "context"]  # fmt: skip
# Objects shaped like events, each field valid, wrong or missing: they reach the schema checks.
near_events = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.text(max_size=300) | json_values,
        "schema_version": st.just(1) | json_values,
        "event_type": st.sampled_from([t.value for t in EventType]) | json_values,
        "user_id": st.text(max_size=300) | json_values,
        "ts": st.integers() | st.just("2026-12-02T10:00:00Z") | json_values,
        **{name: json_values for name in FIELDS[5:]},
    },
)


def _outcome(raw: bytes) -> Event | InvalidEvent:
    try:
        return parse_event(raw)
    except InvalidEvent as error:
        assert error.reason in REASONS and error.detail
        return error


@BOUNDED
@given(st.binary(max_size=MAX_EVENT_BYTES + 64))
def test_any_bytes_are_an_event_or_an_invalid_event_with_a_reason(raw: bytes) -> None:
    _outcome(raw)


@BOUNDED
@given(near_events)
def test_event_shaped_objects_are_parsed_or_rejected_with_a_reason(data: dict) -> None:
    try:
        raw = json.dumps(data, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return
    outcome = _outcome(raw)
    if isinstance(outcome, Event):  # an accepted event round-trips through the contract's encoder
        assert parse_event(outcome.to_bytes()) == outcome
