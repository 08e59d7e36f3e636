"""Training rows from the served log: impressions labelled by a click within a window, with their
features as of the impression through Feast (features.offline.point_in_time).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from adloop.settings import Settings
from features.offline import point_in_time
from streaming.events import Event, EventType


def labelled_impressions(events: Iterable[Event], *, click_window_s: float = 1800.0) -> pd.DataFrame:
    """One row per `ad_impression`; label 1 when a click on the same request and ad follows within the window."""
    impressions, clicks = [], {}
    for event in events:
        if event.event_type == EventType.ad_impression and event.request_id:
            context = event.context or {}
            impressions.append(
                {
                    "request_id": event.request_id,
                    "user_id": event.user_id,
                    "ad_id": event.ad_id,
                    "campaign_id": event.campaign_id,
                    "category": event.category,
                    "advertiser_id": context.get("advertiser_id"),
                    "position": event.position or 1,
                    "device": context.get("device"),
                    "arm": event.arm,
                    "model_version": event.model_version,
                    "propensity": event.propensity,
                    "ts": event.ts_ms,
                }
            )
        elif event.event_type == EventType.ad_click and event.request_id:
            key = (event.request_id, event.ad_id)
            clicks[key] = min(clicks.get(key, event.ts_ms), event.ts_ms)
    frame = pd.DataFrame(impressions)
    if frame.empty:
        return frame
    clicked_at = [clicks.get(key) for key in zip(frame["request_id"], frame["ad_id"], strict=True)]
    window_ms = click_window_s * 1000
    frame["label"] = [
        int(c is not None and 0 <= c - t <= window_ms) for c, t in zip(clicked_at, frame["ts"], strict=True)
    ]
    frame["slate_size"] = frame.groupby("request_id")["ad_id"].transform("size")
    frame["hour"] = (frame["ts"] // 3_600_000) % 24
    return frame


def training_frame(settings: Settings, impressions: pd.DataFrame) -> pd.DataFrame:
    """Impressions with every user_activity and ad_performance feature as of just before each one."""
    rows = impressions.assign(event_timestamp=pd.to_datetime(impressions["ts"], unit="ms", utc=True))
    joined = point_in_time(settings, rows)
    return joined.drop(columns=["event_timestamp"])
