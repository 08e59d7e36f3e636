"""Erasure (`adloop users forget`, `DELETE /v1/users/{id}`): every store, a tombstone, a report; a real Redis."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from typer.testing import CliRunner

from features import tombstones
from outcomes.erasure import consumer_state, feast_user_key, forget_user
from outcomes.store import OutcomeStore
from outcomes.touch_keys import user_touch_key
from streaming.events import Event
from tests.serving.conftest import bundle, catalog_file, catalog_rows  # noqa: F401  (fixtures)
from tests.serving.conftest import make_app as make_app


def _event(user: str, ts_ms: int, kind: str = "ad_impression") -> Event:
    return Event.model_validate(
        {
            "event_id": uuid.uuid4().hex,
            "schema_version": 1,
            "event_type": kind,
            "user_id": user,
            "ts": ts_ms,
            "ad_id": "ad-1",
            "request_id": uuid.uuid4().hex,
            "arm": "targeted",
        }
    )


def test_forget_removes_the_user_everywhere_and_leaves_a_tombstone(feature_settings, tmp_path) -> None:
    settings = feature_settings.model_copy(update={"stack_dir": tmp_path / "stack"})
    client = redis.Redis.from_url(settings.redis_url)
    user, other = f"u-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    state = consumer_state(settings, client)
    client.set(state.user_key(0, user), b"{}")
    client.set(state.user_key(1, other), b"{}")
    client.hset(feast_user_key(user), "f", "v")
    for model in ("click", "impression"):
        client.set(user_touch_key(model, user), b"{}", ex=60)
    client.set(user_touch_key("click", other), b"{}", ex=60)
    offline = settings.feast_data_dir / "offline" / "user_activity"
    offline.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": [user, other, user], "x": [1, 2, 3]}), offline / "batch-1.parquet")
    store = OutcomeStore(settings.outcomes_path)
    store.setup()
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    store.write([_event(user, now_ms - 5000), _event(user, now_ms - 4000, "ad_click"), _event(other, now_ms - 3000)])

    report = forget_user(settings, client, user)

    assert report["removed"] == {"consumer_state": 1, "online_feature_rows": 1, "offline_feature_rows": 2,
                                 "outcome_events": 2, "attribution_touches": 2}  # fmt: skip
    assert client.get(state.user_key(0, user)) is None and client.get(state.user_key(1, other)) is not None
    assert client.get(user_touch_key("click", other)) is not None
    assert pq.read_table(offline / "batch-1.parquet").column("user_id").to_pylist() == [other]
    assert store.outcomes()[0]["impressions"] == 1
    # data still on its way is dropped where it lands: a late event of before the erasure; a new one counts
    store.write([_event(user, now_ms - 2000)])
    assert store.outcomes()[0]["impressions"] == 1
    store.write([_event(user, now_ms + 60_000)])
    assert store.outcomes()[0]["impressions"] == 2
    erased = tombstones.erased(settings, client)
    assert erased[user] >= now_ms
    keep = tombstones.keep_mask([user, user, other], [now_ms - 1, now_ms + 60_000, now_ms - 1], erased)
    assert keep.tolist() == [False, True, True]
    client.hdel(tombstones.REDIS_KEY, user)
    assert tombstones.erased(settings, client)[user] == erased[user]  # the file copy, e.g. Redis lost it


def test_training_sets_skip_erased_users(feature_settings, tmp_path, monkeypatch) -> None:
    from features import offline

    # The tombstone filter runs before Feast's join; the join itself is tested in tests/features.
    monkeypatch.setattr(offline, "_join", lambda settings, store, joined, views: joined)
    point_in_time = offline.point_in_time
    settings = feature_settings.model_copy(update={"stack_dir": tmp_path / "stack"})
    client = redis.Redis.from_url(settings.redis_url)
    tombstones.write(settings, client, "gone", at_ms=2_000_000_000_000)
    rows = pd.DataFrame({"user_id": ["gone", "kept"], "ad_id": ["ad-1", "ad-1"],
                         "event_timestamp": pd.to_datetime([1_900_000_000_000] * 2, unit="ms", utc=True)})  # fmt: skip
    joined = point_in_time(settings, rows)
    assert joined["user_id"].tolist() == ["kept"]


def test_the_cli_and_the_route_erase_and_report(feature_settings, make_app, monkeypatch, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from adloop.cli import app as cli
    from adloop.settings import get_settings

    settings = feature_settings.model_copy(update={"stack_dir": tmp_path / "stack"})
    client = redis.Redis.from_url(settings.redis_url)
    state = consumer_state(settings, client)
    client.set(state.user_key(2, "cli-user"), b"{}")
    for name, value in {"REDIS_URL": settings.redis_url, "STACK_DIR": str(settings.stack_dir),
                        "EVENTS_TOPIC": settings.events_topic,
                        "FEAST_DATA_DIR": str(settings.feast_data_dir),
                        "OUTCOMES_PATH": str(settings.outcomes_path)}.items():  # fmt: skip
        monkeypatch.setenv(f"ADLOOP_{name}", value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["users", "forget", "cli-user"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output)["removed"]["consumer_state"] == 1
    client.set(state.user_key(3, "api-user"), b"{}")
    app, _ = make_app(redis_url=settings.redis_url, stack_dir=settings.stack_dir, events_topic=settings.events_topic,
                      feast_data_dir=settings.feast_data_dir, outcomes_path=settings.outcomes_path)  # fmt: skip
    with TestClient(app) as api:
        answer = api.delete("/v1/users/api-user", headers={"Authorization": "Bearer secret"})
    assert answer.status_code == 200 and answer.json()["removed"]["consumer_state"] == 1
    assert client.get(state.user_key(3, "api-user")) is None


def test_the_consumer_skips_an_erased_users_events_still_in_kafka(feature_settings) -> None:
    """Events of before the erasure replayed from Kafka do not bring the user's state back; a later one counts."""
    from features.online import features_via_feast
    from features.store import USER_VIEW
    from tests.support.stack import consume_all, produce

    settings, client = feature_settings, redis.Redis.from_url(feature_settings.redis_url)
    user, other = f"u-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    old = [_event(user, now_ms - 60_000 + i) for i in range(5)] + [_event(other, now_ms - 60_000)]
    produce(settings, old)
    assert consume_all(settings, len(old)).applied == len(old)
    forget_user(settings, client, user)
    assert features_via_feast(settings, USER_VIEW, [user])[user].get("impressions_total") in (None, 0)

    # the same old activity again (a replay under new ids), then one event after the erasure
    replayed = [_event(user, now_ms - 60_000 + i) for i in range(5)]
    later = _event(user, int(datetime.now(UTC).timestamp() * 1000) + 1000)
    produce(settings, [*replayed, later])
    report = consume_all(settings, len(replayed) + 1, group="test-features")
    assert (report.erased, report.applied) == (5, 1)
    state = consumer_state(settings, client)
    assert sum(client.exists(state.user_key(p, user)) for p in range(settings.event_partitions)) == 1  # the new event
    online = features_via_feast(settings, USER_VIEW, [user, other])
    assert online[user]["impressions_total"] == 1 and online[other]["impressions_total"] == 1
