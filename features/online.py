"""Online feature reads: through Feast (reference), and the request path's direct read of Feast's Redis layout.

Feast 0.67 stores one Redis hash per entity and project: key = serialized entity key + project
name; fields = murmur3-32 of "<view>:<feature>" (4 bytes, little-endian) and `_ts:<view>`;
values = serialized `feast.types.Value` protobufs. `OnlineFeatureReader` reads that hash with
one HMGET per user (Feast's Python path costs milliseconds), and a test proves it returns
exactly what `get_online_features` returns.
"""

from __future__ import annotations

from typing import Any

from adloop.settings import Settings
from features.store import USER_VIEW, open_store


def features_via_feast(settings: Settings, view: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every feature of `view` for each id, through `get_online_features` (values None where unknown)."""
    store = open_store(settings)
    refs = [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
    key = "user_id" if view == USER_VIEW else "ad_id"
    rows = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
    return {entity: {name: values[n] for name, values in rows.items() if name != key} for n, entity in enumerate(ids)}


def user_features_via_feast(settings: Settings, user_id: str) -> dict[str, Any]:
    return features_via_feast(settings, USER_VIEW, [user_id])[user_id]
