"""An independent batch recomputation of the user features with pandas, to check the streaming path.

It follows the documented definitions (docs in streaming/aggregates.py), not the incremental code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from streaming.events import Event

WINDOWS = {"1h": (300_000, 12), "24h": (3_600_000, 24), "7d": (3_600_000, 168)}
TYPES = ["page_view", "search", "favorite", "add_to_cart", "purchase", "ad_impression", "ad_click", "conversion"]
WEIGHTS = {"page_view": 1.0, "favorite": 2.0, "add_to_cart": 3.0, "purchase": 4.0, "ad_click": 2.0, "conversion": 4.0,
           "search": 1.0}  # fmt: skip
HALF_LIFE_MS = 6 * 3_600_000


def frame(events: list[Event]) -> pd.DataFrame:
    """Events in arrival order as a table."""
    return pd.DataFrame(
        {
            "user_id": [e.user_id for e in events],
            "type": [e.event_type.value for e in events],
            "ts": [e.ts_ms for e in events],
            "item_id": [e.item_id for e in events],
            "category": [e.category for e in events],
            "ad_id": [e.ad_id for e in events],
            "campaign_id": [e.campaign_id for e in events],
        }
    )


def user_features(events: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """user id -> features, computed per user over the whole table."""
    return {user: _one_user(group) for user, group in events.groupby("user_id", sort=False)}


def _one_user(g: pd.DataFrame) -> dict[str, Any]:
    now = int(g["ts"].max())
    row: dict[str, Any] = {}
    for window, (size, n) in WINDOWS.items():
        inside = g[(g["ts"] // size) > (now // size) - n]
        counts = inside["type"].value_counts()
        row.update({f"{t}_{window}": int(counts.get(t, 0)) for t in TYPES})
    scored = g[g["category"].notna() & g["type"].isin(list(WEIGHTS))]
    scores = (
        (scored["type"].map(WEIGHTS) * np.power(0.5, (now - scored["ts"]) / HALF_LIFE_MS))
        .groupby(scored["category"])
        .sum()
    )
    top = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    row["top_categories"] = [c for c, _ in top]
    row["top_category_scores"] = [float(s) for _, s in top]
    browsing = g[~g["type"].isin(["ad_impression", "ad_click", "conversion"])]
    row["recent_items"] = browsing["item_id"].dropna().tolist()[-20:]
    row["recent_categories"] = browsing["category"].dropna().tolist()[-20:]
    ads = g[g["type"].isin(["ad_impression", "ad_click"])]
    day = ads[(ads["ts"] // 3_600_000) > (now // 3_600_000) - 24]
    for prefix, column in (("ad", "ad_id"), ("campaign", "campaign_id")):
        table = day.dropna(subset=[column]).groupby(column)["type"].value_counts().unstack(fill_value=0)
        ids = sorted(table.index)
        row[f"freq_{prefix}_ids"] = ids
        row[f"freq_{prefix}_impressions_24h"] = [int(table.loc[i].get("ad_impression", 0)) for i in ids]
        row[f"freq_{prefix}_clicks_24h"] = [int(table.loc[i].get("ad_click", 0)) for i in ids]
    row["impressions_total"] = int((g["type"] == "ad_impression").sum())
    row["clicks_total"] = int((g["type"] == "ad_click").sum())
    row["user_ctr"] = (row["clicks_total"] + 1.0) / (row["impressions_total"] + 20.0)
    row["last_seen_ms"] = now
    return row


def assert_features_equal(expected: dict[str, Any], actual: dict[str, Any], user: str) -> None:
    """Exact for counts, ids and lists; floats to 1e-9 relative (decay products differ in rounding order)."""
    for name, value in expected.items():
        got = actual.get(name)
        if name in ("top_category_scores", "user_ctr"):
            assert np.allclose(np.asarray(got, dtype=float), np.asarray(value, dtype=float), rtol=1e-9, atol=0), (
                user,
                name,
            )
        else:
            assert list(got) == list(value) if isinstance(value, list) else got == value, (user, name, got, value)
