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
from features.store import AD_VIEW, USER_VIEW, open_store


def user_features_via_feast(settings: Settings, user_id: str) -> dict[str, Any]:
    """All `user_activity` features of one user through `get_online_features` (None where unknown)."""
    store = open_store(settings)
    view = store.get_feature_view(USER_VIEW)
    refs = [f"{USER_VIEW}:{f.name}" for f in view.features]
    row = store.get_online_features(features=refs, entity_rows=[{"user_id": user_id}]).to_dict()
    return {name: values[0] for name, values in row.items()}


def ad_features_via_feast(settings: Settings, ad_ids: list[str]) -> dict[str, dict[str, Any]]:
    store = open_store(settings)
    view = store.get_feature_view(AD_VIEW)
    refs = [f"{AD_VIEW}:{f.name}" for f in view.features]
    rows = store.get_online_features(features=refs, entity_rows=[{"ad_id": a} for a in ad_ids]).to_dict()
    return {ad: {k: v[i] for k, v in rows.items()} for i, ad in enumerate(ad_ids)}
