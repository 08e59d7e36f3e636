"""Training on the served log: labels from clicks, features through real Feast as of each impression."""

from __future__ import annotations

import random

import pytest

from adloop.settings import Settings
from models.dataset import labelled_impressions, training_frame
from models.registry import Registry
from models.retrain import train_from_log
from streaming.events import Event
from streaming.topic_reader import read_events
from tests.support.stack import consume_all, produce

pytestmark = pytest.mark.integration
T0 = 1_700_000_000_000
CATEGORIES = ["sports", "tech", "food", "travel"]


def served_log(requests: int, seed: int = 1) -> list[Event]:
    """Users browse their favourite category, are shown 4 ads (one per category) and click mostly their own.
    The slate is uniformly random, so each pick's propensity is 1 / (the ads left of 12 at its rank)."""
    rng = random.Random(seed)
    events, ts = [], T0
    for r in range(requests):
        user = f"user-{rng.randrange(60)}"
        favourite = CATEGORIES[int(user.split("-")[1]) % len(CATEGORIES)]
        ts += 5_000
        events.append(Event(event_id=f"pv-{r}", schema_version=1, event_type="page_view", user_id=user, ts=ts,
                            item_id=f"item-{rng.randrange(30)}", category=favourite))  # fmt: skip
        for position, category in enumerate(rng.sample(CATEGORIES, 4), start=1):
            ad = f"ad-{category}-{rng.randrange(3)}"
            common = {"schema_version": 1, "user_id": user, "ad_id": ad, "campaign_id": f"camp-{category}",
                      "category": category, "request_id": f"req-{r}", "position": position,
                      "propensity": 1 / (3 * (5 - position))}  # fmt: skip
            events.append(Event(event_id=f"imp-{r}-{position}", event_type="ad_impression", ts=ts + 100, **common))
            if rng.random() < (0.5 if category == favourite else 0.03):
                events.append(Event(event_id=f"clk-{r}-{position}", event_type="ad_click", ts=ts + 1_100, **common))
    return events


def test_labels_count_only_clicks_inside_the_window() -> None:
    shown = Event(event_id="i", schema_version=1, event_type="ad_impression", user_id="u", ad_id="a", request_id="r",
                  ts=T0)  # fmt: skip
    late = Event(**{**shown.model_dump(), "event_id": "c", "event_type": "ad_click", "ts": T0 + 7_200_000})
    assert labelled_impressions([shown, late], click_window_s=60)["label"].tolist() == [0]
    assert labelled_impressions([shown, late], click_window_s=86_400)["label"].tolist() == [1]


def test_training_rows_never_see_their_own_click_and_the_model_learns_the_preference(
    feature_settings: Settings,
) -> None:
    events = served_log(900)
    produce(feature_settings, events)
    consume_all(feature_settings, len(events))
    logged = list(read_events(feature_settings))
    assert len(logged) == len(events)

    frame = training_frame(feature_settings, labelled_impressions(logged))
    # Point in time: every row's user features predate its impression, so its own click (1 s
    # later, counted in clicks_total online) is never in its row.
    assert (frame["last_seen_ms"].fillna(0) < frame["ts"]).all()
    click_times = {}
    for event in logged:
        if event.event_type == "ad_click":
            click_times.setdefault(event.user_id, []).append(event.ts_ms)
    for row in frame.itertuples():
        earlier = sum(t < row.ts for t in click_times.get(row.user_id, []))
        assert (0 if row.clicks_total != row.clicks_total else row.clicks_total) <= earlier
    assert frame["clicks_total"].fillna(0).sum() > 0  # the join did find features

    done = train_from_log(feature_settings, logged, seed=3, promote=True)
    assert Registry(feature_settings.model_registry_path).promoted() == done["version"]
    assert done["holdout"]["group_auc"] > 0.75, done["holdout"]  # the favourite category is learnable


def test_served_with_the_trained_model_and_live_features(feature_settings: Settings, tmp_path) -> None:
    """Collect -> learn -> serve: the API ranks with the promoted model over the user's Feast features."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    events = served_log(900, seed=2)
    produce(feature_settings, events)
    consume_all(feature_settings, len(events))
    version = train_from_log(feature_settings, list(read_events(feature_settings)), seed=1, promote=True)["version"]

    catalog = tmp_path / "ads.csv"
    header = "ad_id,campaign_id,advertiser_id,advertiser_domain,category,formats,bid,daily_budget,start_date,end_date,"
    header += "freq_cap_ad,freq_cap_campaign,deal_ids,title,image_url,landing_url\n"
    rows = [f"ad-{c}-{n},camp-{c},adv-{c},{c}.example.com,{c},native,1.0,0,,,0,0,,{c} {n},https://x/{n}.jpg,https://x/{n}"
            for c in CATEGORIES for n in range(3)]  # fmt: skip
    catalog.write_text(header + "\n".join(rows) + "\n")
    settings = feature_settings.model_copy(update={"catalog_path": catalog, "serve_epsilon": 0.0, "control_share": 0.0})

    wins = 0
    with TestClient(create_app(settings)) as client:
        for n in range(40):
            user = f"user-{n}"
            favourite = CATEGORIES[n % len(CATEGORIES)]
            body = {"user_id": user, "slots": [{"slot_id": "s", "format": "native"}]}
            answer = client.post("/v1/select", json=body)
            assert answer.status_code == 200, answer.text
            chosen = answer.json()["slots"][0]["ads"][0]
            assert answer.json()["fallback"] is False, answer.json()
            assert answer.json()["model_version"] == version
            wins += chosen["ad_id"].startswith(f"ad-{favourite}-")
    assert wins >= 30, f"the favourite category won only {wins} of 40 requests"  # random would win ~10


def test_the_point_in_time_join_only_swaps_dask_tokens_of_list_columns_and_restores_them() -> None:
    """features.offline: object arrays of lists get random tokens inside the join (dask would pickle them
    whole, again and again); text keeps dask's content hash, and dask's own handler is back afterwards."""
    import numpy as np
    from dask.tokenize import normalize_token, tokenize

    from features.offline import _list_columns_tokenized_by_identity

    lists = np.empty(2, dtype=object)
    lists[0], lists[1] = ["a"], ["b", "c"]
    texts = np.array(["a", "b"], dtype=object)
    before = normalize_token.dispatch(np.ndarray)
    with _list_columns_tokenized_by_identity():
        assert tokenize(lists) != tokenize(lists)
        assert tokenize(texts) == tokenize(texts)
    assert normalize_token.dispatch(np.ndarray) is before
    assert tokenize(lists) == tokenize(lists)
