"""The feature consumer against real Kafka, Redis and Feast."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import redis
from kafka import KafkaConsumer

from adloop.settings import Settings
from features.aggregates import UserState, apply_user, user_features
from features.offline import point_in_time
from features.online import features_via_feast
from features.store import AD_VIEW, ARTICLE_VIEW, TRANSITION_VIEW, USER_VIEW
from streaming.dead_letters import describe
from streaming.events import Event
from tests.support import batch_features
from tests.support.events import synthetic_events
from tests.support.stack import adloop_env, applied_events, consume_all, produce, shared_data, stop_when_applied

pytestmark = pytest.mark.integration


def assert_online_equals_batch(settings: Settings, events: list[Event]) -> None:
    expected = batch_features.user_features(batch_features.frame(events))
    online = features_via_feast(settings, USER_VIEW, sorted(expected))
    for user, features in expected.items():
        batch_features.assert_features_equal(features, online[user], user)
    # Article flow: the rows through Feast equal the evaluation's in-memory fold of the same clicks.
    flow = batch_features.article_flow(events)
    articles, pairs = batch_features.flow_ids(flow)
    assert bool(articles and pairs) == any(e.session_id for e in events)  # Taobao's events name no session
    if not articles:
        return
    batch_features.assert_article_flow_equal(
        flow, features_via_feast(settings, ARTICLE_VIEW, articles), features_via_feast(settings, TRANSITION_VIEW, pairs)
    )


def test_online_and_offline_features_equal_a_batch_recomputation(any_feature_settings: Settings) -> None:
    events = synthetic_events(2000, users=30)
    produce(any_feature_settings, events)
    report = consume_all(any_feature_settings, len(events))
    assert report.applied == len(events)
    assert_online_equals_batch(any_feature_settings, events)

    # Ad performance: impressions and clicks per ad over the last 7 days of each ad's events.
    table = batch_features.frame(events)
    ads = sorted(table["ad_id"].dropna().unique())
    online_ads = features_via_feast(any_feature_settings, AD_VIEW, ads)
    for ad in ads:
        mine = table[table["ad_id"] == ad]
        assert online_ads[ad]["ad_impressions_7d"] == int((mine["type"] == "ad_impression").sum())
        assert online_ads[ad]["ad_clicks_7d"] == int((mine["type"] == "ad_click").sum())

    # Offline: a point-in-time row holds what serving read at that moment: the state after some
    # earlier batch, never an event at or after the row's own time.
    sample = table.iloc[[100, 900, 1500, 1999]]
    rows = pd.DataFrame(
        {
            "user_id": sample["user_id"],
            "ad_id": "none",
            "event_timestamp": pd.to_datetime(sample["ts"], unit="ms", utc=True),
        }
    )
    joined = point_in_time(any_feature_settings, rows, views=(USER_VIEW,))
    assert joined["last_seen_ms"].notna().sum() >= 3
    for n, (_, event) in enumerate(sample.iterrows()):
        seen_until = joined.iloc[n]["last_seen_ms"]
        if pd.isna(seen_until):
            continue  # no batch of this user had landed before: serving had no features either
        assert seen_until < event["ts"], "a feature row from the future leaked into a training row"
        prefix = table[(table["user_id"] == event["user_id"]) & (table["ts"] <= seen_until)]
        expected = batch_features.user_features(prefix)[event["user_id"]]
        assert joined.iloc[n]["page_view_24h"] == expected["page_view_24h"]
        assert list(joined.iloc[n]["recent_items"]) == expected["recent_items"]

    # The latest offline row of each user is the row served online.
    latest = point_in_time(
        any_feature_settings,
        pd.DataFrame({"user_id": sorted(expected_users := set(table["user_id"])), "ad_id": "none",
                      "event_timestamp": pd.Timestamp(int(table["ts"].max()) + 1, unit="ms", tz="UTC")}),
        views=(USER_VIEW,),
    )  # fmt: skip
    online = features_via_feast(any_feature_settings, USER_VIEW, sorted(expected_users))
    for _, row in latest.iterrows():
        assert row["last_seen_ms"] == online[row["user_id"]]["last_seen_ms"]
        assert row["add_to_cart_7d"] == online[row["user_id"]]["add_to_cart_7d"]


def test_bad_events_go_to_the_dead_letter_topic_with_their_reason(feature_settings: Settings) -> None:
    good = synthetic_events(20, users=3, seed=11)
    valid = json.loads(good[0].to_bytes())
    far_future = {**valid, "event_id": "future", "ts": int(time.time() * 1000) + 86_400_000}
    corpus = {
        "invalid_json": b'{"event_id": "x", ',
        "not_utf8": b'{"event_id": "\xff\xfe"}',
        "schema": json.dumps({k: v for k, v in valid.items() if k != "user_id"} | {"event_id": "no-user"}).encode(),
        "unknown_event_type": json.dumps({**valid, "event_id": "odd", "event_type": "teleport"}).encode(),
        "future_timestamp": json.dumps(far_future).encode(),
        "oversized": json.dumps({**valid, "event_id": "big", "context": {"blob": "x" * 20_000}}).encode(),
    }
    mistyped = json.dumps({**valid, "event_id": "bad-ts", "ts": "yesterday"}).encode()
    messages = [*good[:10], *[(b"user-0", raw) for raw in corpus.values()], (b"user-0", mistyped), *good[10:], good[3]]
    produce(feature_settings, messages)
    report = consume_all(feature_settings, len(messages))
    assert report.applied == len(good)
    assert report.duplicates == 1
    assert report.dead_lettered == {**dict.fromkeys(corpus, 1), "schema": 2}

    letters = KafkaConsumer(
        feature_settings.dlq_topic, bootstrap_servers=feature_settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest", consumer_timeout_ms=5000,
    )  # fmt: skip
    received = {bytes(m.value): describe(m.headers) for m in letters}
    letters.close()
    for reason, raw in corpus.items():
        assert received[raw]["reason"] == reason  # the original bytes, unchanged, with why
        assert received[raw]["source.topic"] == feature_settings.events_topic
        assert int(received[raw]["source.offset"]) >= 0
    assert "ts" in received[mistyped]["detail"]  # names the field
    assert "user_id" in received[corpus["schema"]]["detail"]
    assert_online_equals_batch(feature_settings, good)


def test_a_crash_mid_replay_changes_no_feature(any_feature_settings: Settings) -> None:
    events = synthetic_events(6000, users=60, seed=3)
    produce(any_feature_settings, events)
    env = {**os.environ, **adloop_env(any_feature_settings), "ADLOOP_CONSUMER_BATCH_SIZE": "100"}
    command = [sys.executable, "-m", "adloop.cli", "consume", "--idle-exit", "10", "--metrics-port", "0"]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while applied_events(any_feature_settings) < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    applied_before_crash = applied_events(any_feature_settings)
    assert 0 < applied_before_crash < len(events), "the kill must land mid-replay"

    done = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop_when_applied([done], any_feature_settings, len(events))
    assert done.returncode == 0, done.stdout.read()
    assert_online_equals_batch(any_feature_settings, events)


def test_two_consumers_in_one_group_share_the_partitions(any_feature_settings: Settings) -> None:
    events = synthetic_events(4000, users=80, seed=5)
    env = {**os.environ, **adloop_env(any_feature_settings)}
    # idle long enough for the later of two starting processes to join (a process start imports Feast);
    # both are stopped (SIGTERM) once every event is applied
    command = [sys.executable, "-m", "adloop.cli", "consume", "--idle-exit", "60", "--metrics-port", "0"]
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs: list[list[str]] = [[], []]
    readers = [
        threading.Thread(target=lambda r=run, log=log: log.extend(r.stdout), daemon=True)
        for run, log in zip(runs, logs, strict=True)
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 120  # two processes starting and a rebalance, on a loaded 2-core machine
    while sorted(p for log in logs for p in _last_assignment(log)) != list(
        range(any_feature_settings.event_partitions)
    ) or not all(map(_last_assignment, logs)):
        assert time.monotonic() < deadline, f"both consumers never held partitions: {logs}"
        time.sleep(0.2)
    produce(any_feature_settings, events)  # only now, so that both members share the work
    stop_when_applied(runs, any_feature_settings, len(events))
    for reader in readers:
        reader.join(timeout=10)
    applied = [int("".join(log).split("applied ")[-1].split(",")[0]) for log in logs]
    assert sum(applied) == len(events), logs
    assert all(n > 0 for n in applied), f"one consumer applied nothing: {applied} {logs}"
    assert_online_equals_batch(any_feature_settings, events)


def _last_assignment(log: list[str]) -> list[int]:
    lines = [line for line in list(log) if "partitions assigned: [" in line]
    return json.loads(lines[-1].split("partitions assigned: ")[1]) if lines else []


def test_taobao_replay_features_equal_a_pandas_recomputation(feature_settings: Settings) -> None:
    from streaming.replay import taobao

    events = list(taobao.read(shared_data("taobao", "UserBehavior_timeslice.csv")))
    produce(feature_settings, events)
    settings = feature_settings.model_copy(update={"consumer_batch_size": 5000})
    report = consume_all(settings, len(events))
    assert report.applied == len(events) == 110_300
    assert_online_equals_batch(settings, events)  # all 66,454 users, through Feast's get_online_features


def test_a_taobao_prefix_replayed_on_redis_cluster_equals_a_pandas_recomputation(cluster_stack: Settings,
                                                                                 tmp_path) -> None:  # fmt: skip
    """The same check on Redis Cluster, over a prefix (the whole file is replayed on standalone above)."""
    from adloop.runs.isolated import isolated_settings
    from streaming.replay import taobao

    events = list(taobao.read(shared_data("taobao", "UserBehavior_timeslice.csv")))[:20_000]
    with isolated_settings(cluster_stack, tmp_path, redis_db=0, consumer_batch_size=5000) as settings:
        produce(settings, events)
        assert consume_all(settings, len(events)).applied == len(events)
        assert_online_equals_batch(settings, events)


def test_feast_layout_read_and_write_match_feast(feature_settings: Settings) -> None:
    """Rows written in Feast's layout, and the request path's HMGET read, equal Feast's own push and read."""
    from features.online import FeastLayout, OnlineFeatureReader, write_rows
    from features.sink import FeastSink
    from serving.redis_async import AsyncRedis

    events = synthetic_events(400, users=4, seed=9)
    states = {}
    for event in events:
        states[event.user_id] = apply_user(states.get(event.user_id) or UserState(), event)
    rows = {user: (state.last_ts, user_features(state)) for user, state in states.items()}
    FeastSink(feature_settings).write_online(USER_VIEW, [(f"pushed-{u}", ts, f) for u, (ts, f) in rows.items()])
    layout = FeastLayout.from_settings(feature_settings)
    client = redis.Redis.from_url(feature_settings.redis_url)
    write_rows(client, layout, USER_VIEW, [(f"direct-{u}", ts, f) for u, (ts, f) in rows.items()])

    ids = [f"{kind}-{u}" for u in rows for kind in ("pushed", "direct")]
    via_feast = features_via_feast(feature_settings, USER_VIEW, [*ids, "nobody"])
    reader = OnlineFeatureReader(client, layout, AsyncRedis(feature_settings.redis_url, timeout_s=5.0))
    for user in rows:
        assert via_feast[f"direct-{user}"] == via_feast[f"pushed-{user}"]  # our write == Feast's push
        assert reader.user(f"pushed-{user}") == via_feast[f"pushed-{user}"]  # our read == Feast's read
        assert reader.user(f"pushed-{user}")["freq_ad_ids"] == rows[user][1]["freq_ad_ids"]
        assert asyncio.run(reader.user_async(f"pushed-{user}")) == via_feast[f"pushed-{user}"]  # the routes' read
    assert reader.user("nobody") == {} and asyncio.run(reader.user_async("nobody")) == {}
    assert all(v is None for v in via_feast["nobody"].values())
