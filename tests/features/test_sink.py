"""The offline rows' Arrow table, built column by column, equals the one built through pandas (no services)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from features.aggregates import UserState, apply_user, user_features
from features.sink import ARROW_TYPES, _table
from tests.support.batch_features import view_kinds
from tests.support.events import synthetic_events


def test_rows_become_the_same_table_as_through_pandas() -> None:
    states: dict[str, UserState] = {}
    rows = []
    for event in synthetic_events(400, users=6, seed=5):
        state = states[event.user_id] = apply_user(states.get(event.user_id) or UserState(), event)
        rows.append((event.user_id, state.last_ts, user_features(state)))
    kinds = view_kinds("user_activity")
    schema = pa.schema(
        [pa.field("user_id", pa.string())]
        + [pa.field(name, ARROW_TYPES[kind]) for name, kind in kinds.items()]
        + [pa.field("event_timestamp", pa.timestamp("ns", tz="UTC"))]
    )
    frame = pd.DataFrame([features for _, _, features in rows])
    frame.insert(0, "user_id", [user for user, _, _ in rows])
    frame["event_timestamp"] = pd.to_datetime([ts for _, ts, _ in rows], unit="ms", utc=True)
    via_pandas = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    assert _table(rows, schema).equals(via_pandas)
    assert _table(rows, schema).column("event_timestamp")[0].value == rows[0][1] * 1_000_000
