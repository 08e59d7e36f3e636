"""Feature rows to Feast's offline store, and Feast's own online push (the reference path).

`write_offline`: one parquet file per view per micro-batch under the push source's batch-source
folder, in one Arrow schema per view, read by Feast's offline store as one table (Feast's own
offline write for file sources rewrites the whole file on every call, O(n) per batch, which a
stream cannot afford); `compact` merges the small files before point-in-time joins.
`write_online` (`FeatureStore.push`, ~0.5 ms per row) is not the consumer's path — it writes
Feast's layout directly in its offsets transaction (features/online.py) — but the reference that
path is tested against, and the benchmark's naive baseline.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adloop.settings import Settings
from features.store import JOIN_KEYS, PUSH_SOURCES, open_store


class FeastSink:
    """`write(view, rows)`: rows are (entity id, event time in ms, feature dict)."""

    def __init__(self, settings: Settings) -> None:
        self.store = open_store(settings)
        self.offline_dir = settings.feast_data_dir / "offline"
        self.schemas = {view: arrow_schema(self.store, view) for view in JOIN_KEYS}

    def write_online(self, view: str, rows: Sequence[tuple[str, int, dict[str, Any]]]) -> None:
        if rows:
            self.store.push(PUSH_SOURCES[view], _frame(view, rows), allow_registry_cache=True)

    def write_offline(self, view: str, rows: Sequence[tuple[str, int, dict[str, Any]]], *, name: str) -> Path | None:
        """Append rows as one parquet file; `name` (e.g. partition and offsets) makes a replay overwrite it."""
        if not rows:
            return None
        folder = self.offline_dir / view
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.parquet"
        temporary = folder / f".{uuid.uuid4().hex}.tmp"
        pq.write_table(_table(rows, self.schemas[view]), temporary)
        temporary.replace(path)  # atomic: readers never see half a file
        return path


def _frame(view: str, rows: Sequence[tuple[str, int, dict[str, Any]]]) -> pd.DataFrame:
    frame = pd.DataFrame([features for _, _, features in rows])
    frame.insert(0, JOIN_KEYS[view], [entity for entity, _, _ in rows])
    frame["event_timestamp"] = pd.to_datetime([ts for _, ts, _ in rows], unit="ms", utc=True)
    return frame


def _table(rows: Sequence[tuple[str, int, dict[str, Any]]], schema: pa.Schema) -> pa.Table:
    """The rows as an Arrow table of `schema` (join key, features, event_timestamp), column by column."""
    _, *features, stamp = schema.names
    columns = [pa.array([entity for entity, _, _ in rows], pa.string())]
    columns += [pa.array([row.get(name) for _, _, row in rows], schema.field(name).type) for name in features]
    columns.append(pa.array([ts * 1_000_000 for _, ts, _ in rows], schema.field(stamp).type))  # ms -> ns
    return pa.Table.from_arrays(columns, schema=schema)


def arrow_schema(store: Any, view: str) -> pa.Schema:
    """The offline files' schema, from the view's Feast types (every file the same, even all-empty lists)."""
    fields = [pa.field(JOIN_KEYS[view], pa.string())]
    for feature in store.get_feature_view(view).features:
        fields.append(pa.field(feature.name, ARROW_TYPES[str(feature.dtype)]))
    return pa.schema([*fields, pa.field("event_timestamp", pa.timestamp("ns", tz="UTC"))])


ARROW_TYPES = {"Int64": pa.int64(), "Float64": pa.float64(), "String": pa.string(),
               "Array(String)": pa.list_(pa.string()), "Array(Int64)": pa.list_(pa.int64()),
               "Array(Float64)": pa.list_(pa.float64())}  # fmt: skip


def compact(folder: Path, schema: pa.Schema, *, min_files: int = 16) -> int:
    """Merge the folder's parquet files into one (the stream writes one per micro-batch; dask reads
    thousands of small files slowly). Safe beside a running consumer: only the files listed here are
    merged and removed, and the merged file appears atomically before they go. Returns files merged."""
    parts = sorted(folder.glob("*.parquet"))
    if len(parts) < min_files:
        return 0
    table = pa.concat_tables([pq.read_table(p).select(schema.names).cast(schema) for p in parts])
    temporary = folder / f".{uuid.uuid4().hex}.tmp"
    pq.write_table(table, temporary)
    temporary.replace(folder / f"compacted-{uuid.uuid4().hex}.parquet")
    for part in parts:
        part.unlink(missing_ok=True)
    return len(parts)
