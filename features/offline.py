"""Training sets: point-in-time joins of labelled rows with the features the consumer logged, through Feast.

`point_in_time(settings, rows)` takes rows with `user_id`, `ad_id` and `event_timestamp` (the
moment of the decision) and returns them with every `user_activity` and `ad_performance`
feature as it was strictly before that moment: the values serving saw, never later ones.
"""

from __future__ import annotations

import pandas as pd

from adloop.settings import Settings
from features.store import AD_VIEW, USER_VIEW, open_store

ROW_ID = "_row"


def point_in_time(
    settings: Settings, rows: pd.DataFrame, *, views: tuple[str, ...] = (USER_VIEW, AD_VIEW)
) -> pd.DataFrame:
    """`rows` joined with the features of `views` as of 1 ms before each row's event_timestamp."""
    store = open_store(settings)
    entity = rows.copy()
    entity[ROW_ID] = range(len(entity))
    decided_at = pd.to_datetime(entity["event_timestamp"], utc=True)
    # Strictly before the decision: a state written at the decision's own millisecond (e.g. by
    # the impression being labelled) must not leak into its row.
    entity["event_timestamp"] = decided_at - pd.Timedelta(milliseconds=1)
    refs = [f"{view}:{f.name}" for view in views for f in store.get_feature_view(view).features]
    joined = store.get_historical_features(entity_df=entity, features=refs).to_df()
    # Feast's dask store drops entity rows older than the entity's first feature row; put them
    # back (with no features, which is what serving had) so no labelled row is lost.
    joined = joined.set_index(ROW_ID).reindex(range(len(entity)))
    restored = joined.index[joined["event_timestamp"].isna()]
    for column in entity.columns.drop(ROW_ID):
        joined.loc[restored, column] = entity.set_index(ROW_ID).loc[restored, column]
    joined["event_timestamp"] = decided_at.to_numpy()
    return joined.reset_index(drop=True)
