"""An independent batch recomputation of the user features with pandas, to check the streaming path.

It follows the documented definitions (docs in features/aggregates.py), not the incremental code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from features.article_flow import NEXT, FlowCounters, click_counters, followers, pair_id
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
    """user id -> features, vectorised over all users (group-bys, no per-user Python)."""
    df = events.assign(now=events.groupby("user_id")["ts"].transform("max"))
    users = pd.Index(df["user_id"].unique(), name="user_id")
    out = pd.DataFrame(index=users)
    for window, (size, n) in WINDOWS.items():
        inside = df[(df["ts"] // size) > (df["now"] // size) - n]
        counts = inside.groupby(["user_id", "type"]).size().unstack(fill_value=0)
        counts = counts.reindex(index=users, columns=TYPES, fill_value=0)
        for kind in TYPES:
            out[f"{kind}_{window}"] = counts[kind].astype(int)

    scored = df[df["category"].notna() & df["type"].isin(list(WEIGHTS))]
    weights = scored["type"].map(WEIGHTS) * np.power(0.5, (scored["now"] - scored["ts"]) / HALF_LIFE_MS)
    scores = weights.groupby([scored["user_id"], scored["category"]]).sum().rename("score").reset_index()
    scores = scores.assign(neg=-scores["score"]).sort_values(["user_id", "neg", "category"]).groupby("user_id").head(10)
    top = scores.groupby("user_id", sort=False).agg(list)
    out["top_categories"] = top["category"].reindex(users)
    out["top_category_scores"] = top["score"].reindex(users)

    browsing = df[~df["type"].isin(["ad_impression", "ad_click", "conversion"])]
    for column, name in (("item_id", "recent_items"), ("category", "recent_categories")):
        recent = browsing.dropna(subset=[column]).groupby("user_id").tail(20)
        out[name] = recent.groupby("user_id", sort=False)[column].agg(list).reindex(users)

    ads = df[df["type"].isin(["ad_impression", "ad_click"])]
    day = ads[(ads["ts"] // 3_600_000) > (ads["now"] // 3_600_000) - 24]
    for prefix, column in (("ad", "ad_id"), ("campaign", "campaign_id")):
        table = day.dropna(subset=[column]).groupby(["user_id", column, "type"]).size().unstack(fill_value=0)
        table = (
            table.reindex(columns=["ad_impression", "ad_click"], fill_value=0)
            .reset_index()
            .sort_values(["user_id", column])
        )
        lists = table.groupby("user_id", sort=False).agg(list)
        out[f"freq_{prefix}_ids"] = lists[column].reindex(users)
        out[f"freq_{prefix}_impressions_24h"] = lists["ad_impression"].reindex(users)
        out[f"freq_{prefix}_clicks_24h"] = lists["ad_click"].reindex(users)

    out["impressions_total"] = df[df["type"] == "ad_impression"].groupby("user_id").size().reindex(users, fill_value=0)
    out["clicks_total"] = df[df["type"] == "ad_click"].groupby("user_id").size().reindex(users, fill_value=0)
    out["user_ctr"] = (out["clicks_total"] + 1.0) / (out["impressions_total"] + 20.0)
    out["last_seen_ms"] = df.groupby("user_id")["now"].first().reindex(users)
    records = out.to_dict(orient="index")
    for row in records.values():  # users without such events have empty lists, not NaN
        for name, value in row.items():
            if not isinstance(value, list) and (name.startswith(("top_", "recent_", "freq_"))):
                row[name] = []
    return records


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


def article_flow(events: list[Event]) -> FlowCounters:
    """features.article_flow's counters of the events' clicks (page views of an item in a session), summed in
    memory as the Globo evaluation keeps them; a session's earlier clicks are those of the same user and
    session id before it (a user's events arrive in order)."""
    flow = FlowCounters()
    sessions: dict[tuple[str, str], list[str]] = {}
    for e in events:
        if e.event_type.value == "page_view" and e.item_id and e.session_id:
            earlier = sessions.setdefault((e.user_id, e.session_id), [])
            flow.add(click_counters(earlier, e.item_id, e.ts_ms))
            earlier.append(e.item_id)
    return flow


def assert_article_flow_equal(flow: FlowCounters, articles: dict[str, dict[str, Any]],
                              transitions: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """Online `article_activity` and `article_transition` rows (by id) equal the in-memory fold's."""
    for (kind, a), fields in flow.hashes.items():
        if kind == NEXT:
            for b in followers(fields):
                assert_flow_row_equal(transitions[pair_id(a, b)], flow.transition(a, b), (a, b))
        else:
            assert_flow_row_equal(articles[a], flow.article(a), a)


def assert_flow_row_equal(got: dict[str, Any], expected: dict[str, Any] | None, what: object) -> None:
    """Exact but for the decayed sums (float additions in another order)."""
    assert expected is not None and set(got) >= set(expected), (what, got, expected)
    for name, value in expected.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-12), (what, name)
        else:
            assert (list(got[name]) if isinstance(value, list) else got[name]) == value, (what, name, got[name], value)


def flow_ids(flow: FlowCounters) -> tuple[list[str], list[str]]:
    """The article ids and pair ids the fold holds rows for."""
    articles = sorted(str(a) for kind, a in flow.hashes if kind != NEXT)
    nexts = [(a, fields) for (kind, a), fields in flow.hashes.items() if kind == NEXT]
    pairs = sorted(pair_id(a, b) for a, fields in nexts for b in followers(fields))
    return articles, pairs


def view_kinds(view: str) -> dict[str, str]:
    """A Feast view's feature types as declared in features/repo/definitions.py ("Int64", "Array(String)"...)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADLOOP_FEAST_DATA_DIR", "unused")  # definitions.py reads it at import; no file is touched
        import importlib

        definitions = importlib.import_module("features.repo.definitions")
    return {f.name: str(f.dtype) for f in getattr(definitions, view).features}
