"""The Feast store of adloop, configured from `adloop.settings` (one way to open it)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from adloop.settings import Settings
from features.redis_client import feast_online_store

if TYPE_CHECKING:
    from feast import FeatureStore

USER_VIEW = "user_activity"
AD_VIEW = "ad_performance"
ARTICLE_VIEW = "article_activity"
TRANSITION_VIEW = "article_transition"
JOIN_KEYS = {USER_VIEW: "user_id", AD_VIEW: "ad_id", ARTICLE_VIEW: "article_id", TRANSITION_VIEW: "article_pair"}
PUSH_SOURCES = {view: f"{view}_push" for view in JOIN_KEYS}


def feast_environment(settings: Settings) -> dict[str, str]:
    """The ${ADLOOP_FEAST_*} values that feature_store.yaml and definitions.py read."""
    redis_type, connection = feast_online_store(settings)
    return {
        "ADLOOP_FEAST_DATA_DIR": str(settings.feast_data_dir),
        "ADLOOP_FEAST_REDIS": connection,
        "ADLOOP_FEAST_REDIS_TYPE": redis_type,
    }


def open_store(settings: Settings) -> FeatureStore:
    from feast import FeatureStore

    os.environ.update(feast_environment(settings))
    return FeatureStore(repo_path=str(settings.feast_repo_path))


def apply(settings: Settings) -> FeatureStore:
    """`feast apply` for this repo: register entities, sources and views (idempotent)."""
    os.environ.update(feast_environment(settings))
    for view in JOIN_KEYS:
        (settings.feast_data_dir / "offline" / view).mkdir(parents=True, exist_ok=True)
    import importlib

    from features.repo import definitions

    definitions = importlib.reload(definitions)  # it reads the data folder from the environment at import
    store = open_store(settings)
    store.apply(
        [
            definitions.user,
            definitions.ad,
            definitions.article,
            definitions.article_pair,
            definitions.user_activity_source,
            definitions.ad_performance_source,
            definitions.article_activity_source,
            definitions.article_transition_source,
            definitions.user_activity,
            definitions.ad_performance,
            definitions.article_activity,
            definitions.article_transition,
            definitions.ranker_v1,
        ]
    )
    return store
