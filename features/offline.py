"""Training sets: point-in-time joins of labelled rows with the features the consumer logged, through Feast.

`point_in_time(settings, rows)` takes rows with `user_id`, `ad_id` and `event_timestamp` (the
moment of the decision) and returns them with every `user_activity` and `ad_performance`
feature as it was strictly before that moment: the values serving saw, never later ones.
It first compacts each view's per-batch parquet files (features/sink.py), which dask reads slowly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
from dask.tokenize import normalize_token

from adloop.settings import Settings
from features import tombstones
from features.sink import arrow_schema, compact
from features.store import AD_VIEW, JOIN_KEYS, USER_VIEW, open_store


def point_in_time(
    settings: Settings, rows: pd.DataFrame, *, views: tuple[str, ...] = (USER_VIEW, AD_VIEW)
) -> pd.DataFrame:
    """`rows` joined with the features of `views` as of 1 ms before each row's event_timestamp; rows of
    users erased since (features.tombstones) are left out."""
    store = open_store(settings)
    decided_at = pd.to_datetime(rows["event_timestamp"], utc=True)
    if "user_id" in rows:
        keep = tombstones.keep_mask(
            rows["user_id"], decided_at.astype("int64") // 1_000_000, tombstones.erased(settings)
        )
        rows, decided_at = rows[keep], decided_at[keep]
    # Strictly before the decision: a state written at the decision's own millisecond (e.g. by
    # the impression being labelled) must not leak into its row.
    joined = rows.assign(event_timestamp=decided_at - pd.Timedelta(milliseconds=1)).reset_index(drop=True)
    with _list_columns_tokenized_by_identity():
        joined = _join(settings, store, joined, views)
    joined["event_timestamp"] = decided_at.to_numpy()
    return joined


def _join(settings: Settings, store, joined: pd.DataFrame, views: tuple[str, ...]) -> pd.DataFrame:
    for view in views:
        compact(settings.feast_data_dir / "offline" / view, arrow_schema(store, view))
        key = JOIN_KEYS[view]
        refs = [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
        # Feast's dask store keeps one row per (key, time) and drops a row older than its entity's
        # first feature row: ask once per distinct (key, time) and left-join the answers back, so
        # every row keeps its place (with no features where serving had none).
        asked = joined[[key, "event_timestamp"]].drop_duplicates()
        found = store.get_historical_features(entity_df=asked, features=refs).to_df()
        found["event_timestamp"] = pd.to_datetime(found["event_timestamp"], utc=True)
        names = [ref.split(":", 1)[1] for ref in refs]
        joined = joined.merge(found[[key, "event_timestamp", *names]], on=[key, "event_timestamp"], how="left")
    return joined


@contextmanager
def _list_columns_tokenized_by_identity() -> Iterator[None]:
    """Dask names every in-memory frame Feast's dask store builds by hashing its content; an object column
    of lists (recent_items, top_categories...) is pickled whole, up to three times, each time: nearly all
    of a join's time (the demo's first training spent ~2 min in it). Inside the join such arrays get a
    fresh random token instead, which is what dask itself falls back to for objects it cannot hash
    (nothing is cached across calls; the joined frames are identical)."""
    normalize_token(np.zeros(1))  # dask registers its numpy handler lazily: make sure it is the one we wrap
    numpy_token = normalize_token.dispatch(np.ndarray)

    def token(x: np.ndarray):
        if x.dtype.hasobject and x.shape:
            try:
                "-".join(x.flat)  # text: dask's own fast path hashes it
            except TypeError:
                return ("adloop-object-array", uuid.uuid4().hex)
        return numpy_token(x)

    normalize_token.register(np.ndarray, token)
    try:
        yield
    finally:
        normalize_token.register(np.ndarray, numpy_token)
