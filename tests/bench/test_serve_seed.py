"""bench.serve's seeded rows are whole `user_activity` rows that Feast reads back (real Redis and Feast)."""

from __future__ import annotations

import pytest

from adloop.settings import Settings
from bench.serve import seed_features
from features import store
from features.online import features_via_feast
from features.redis_client import redis_client
from features.store import USER_VIEW
from serving.catalog import generate_catalog

pytestmark = pytest.mark.integration


def test_seeded_users_have_every_feature_of_the_view(feature_settings: Settings) -> None:
    store.apply(feature_settings)
    users, rows = seed_features(feature_settings, redis_client(feature_settings), generate_catalog(60, seed=3))
    read = features_via_feast(feature_settings, USER_VIEW, users[:3])
    for user in users[:3]:
        assert read[user]["session_length"] == rows[user]["session_length"]
        assert list(read[user]["recent_items"]) == rows[user]["recent_items"]
