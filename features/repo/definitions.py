"""Feast definitions: entities, push sources and feature views fed by the streaming consumer.

Feature names come from `features.aggregates` (the one place they are computed). Offline
rows land as parquet files under ${ADLOOP_FEAST_DATA_DIR}/offline/<view>/ (one per micro-batch).
"""

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float64, Int64, String

from features.aggregates import EVENT_TYPES, WINDOWS

OFFLINE_DIR = os.path.join(os.environ["ADLOOP_FEAST_DATA_DIR"], "offline")

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="A site visitor.")
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.STRING, description="An ad of the catalog.")
article = Entity(
    name="article", join_keys=["article_id"], value_type=ValueType.STRING, description="An item read in sessions."
)
article_pair = Entity(
    name="article_pair",
    join_keys=["article_pair"],
    value_type=ValueType.STRING,
    description="'<a> <b>': b read after a in a session (features.article_flow.pair_id).",
)

user_activity_source = PushSource(
    name="user_activity_push",
    batch_source=FileSource(
        name="user_activity_log", path=os.path.join(OFFLINE_DIR, "user_activity"), timestamp_field="event_timestamp"
    ),
)
ad_performance_source = PushSource(
    name="ad_performance_push",
    batch_source=FileSource(
        name="ad_performance_log", path=os.path.join(OFFLINE_DIR, "ad_performance"), timestamp_field="event_timestamp"
    ),
)


def _logged(view: str) -> PushSource:
    """A view's push source, its rows also in the offline log folder of the view."""
    log = FileSource(name=f"{view}_log", path=os.path.join(OFFLINE_DIR, view), timestamp_field="event_timestamp")
    return PushSource(name=f"{view}_push", batch_source=log)


article_activity_source = _logged("article_activity")
article_transition_source = _logged("article_transition")

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=timedelta(days=7),
    schema=[
        *[Field(name=f"{kind}_{window}", dtype=Int64) for window in WINDOWS for kind in EVENT_TYPES],
        Field(name="top_categories", dtype=Array(String), description="Top categories by decayed affinity."),
        Field(name="top_category_scores", dtype=Array(Float64)),
        Field(name="recent_items", dtype=Array(String), description="Last items seen, newest last."),
        Field(name="recent_categories", dtype=Array(String)),
        Field(name="freq_ad_ids", dtype=Array(String), description="Ads shown to the user in the last 24 h."),
        Field(name="freq_ad_impressions_24h", dtype=Array(Int64)),
        Field(name="freq_ad_clicks_24h", dtype=Array(Int64)),
        Field(name="freq_campaign_ids", dtype=Array(String)),
        Field(name="freq_campaign_impressions_24h", dtype=Array(Int64)),
        Field(name="freq_campaign_clicks_24h", dtype=Array(Int64)),
        Field(name="impressions_total", dtype=Int64),
        Field(name="clicks_total", dtype=Int64),
        Field(name="user_ctr", dtype=Float64, description="Smoothed click rate, all time."),
        Field(name="last_seen_ms", dtype=Int64),
        Field(name="session_id", dtype=String, description="The session of the latest page view naming one."),
        Field(name="session_items", dtype=Array(String), description="Its last clicks, newest last."),
        Field(name="session_length", dtype=Int64),
        Field(name="session_last_ms", dtype=Int64),
    ],
    source=user_activity_source,
    online=True,
)

ad_performance = FeatureView(
    name="ad_performance",
    entities=[ad],
    ttl=timedelta(days=7),
    schema=[
        *[Field(name=f"ad_{count}_{window}", dtype=Int64) for window in WINDOWS for count in ("impressions", "clicks")],
        Field(name="ad_ctr_24h", dtype=Float64),
        Field(name="ad_ctr_7d", dtype=Float64),
        Field(name="ad_last_seen_ms", dtype=Int64),
    ],
    source=ad_performance_source,
    online=True,
)

# Rows of features.article_flow (as of the article's last click); the ranker's features at a moment are
# computed from them by `features.article_flow.candidate_features`.
article_activity = FeatureView(
    name="article_activity",
    entities=[article],
    ttl=timedelta(days=7),
    schema=[
        Field(name="clicks_total", dtype=Int64),
        Field(name="first_click_ms", dtype=Int64),
        Field(name="last_click_ms", dtype=Int64),
        Field(name="transitions_in", dtype=Int64, description="Clicks on it right after another in a session."),
        Field(name="transitions_out", dtype=Int64, description="Clicks right after it in a session."),
        Field(name="minute_buckets", dtype=Array(Int64), description="Minutes (unix ms // 60000) of the last hour."),
        Field(name="minute_clicks", dtype=Array(Int64)),
        Field(name="clicks_decayed", dtype=Float64, description="Clicks decayed with a 1 h half-life."),
    ],
    source=article_activity_source,
    online=True,
)

article_transition = FeatureView(
    name="article_transition",
    entities=[article_pair],
    ttl=timedelta(days=7),
    schema=[
        Field(name="transitions", dtype=Int64, description="Times b was read right after a."),
        Field(name="transitions_near", dtype=Int64, description="Times b was read within 3 clicks after a."),
        Field(name="transitions_decayed", dtype=Float64, description="`transitions` decayed, 2 h half-life."),
        Field(name="transition_last_ms", dtype=Int64),
    ],
    source=article_transition_source,
    online=True,
)

ranker_v1 = FeatureService(name="ranker_v1", features=[user_activity, ad_performance])
