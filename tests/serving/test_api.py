"""`POST /v1/select` and the other JSON routes through `create_app` (TestClient)."""

from __future__ import annotations

import gc
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from features.online import FeastLayout, OnlineFeatureReader, write_rows
from features.redis_client import redis_client
from models.testing import EmptyRegistry, ProjectionBundle, StaticRegistry
from serving.catalog import generate_catalog, write_catalog
from serving.schemas import SelectResponse
from tests.support.serving import MemoryReader, free_port

SLOTS = [{"slot_id": "top", "format": "banner_728x90"}, {"slot_id": "feed", "format": "native", "count": 2}]
ADMIN = {"Authorization": "Bearer secret"}  # conftest's admin token
TECH = {"top_categories": ["tech"], "top_category_scores": [1.0]}


def _redis_of(settings) -> dict:
    """The make_app settings that point an app at the Redis (standalone or cluster) and Feast repo of `settings`."""
    return {"redis_url": settings.redis_url, "redis_cluster_nodes": settings.redis_cluster_nodes,
            "feast_data_dir": settings.feast_data_dir}  # fmt: skip


def select(client: TestClient, **body):
    return client.post("/v1/select", json={"user_id": "u-1", "slots": SLOTS, **body})


def test_select_answers_each_slot_in_rank_order(make_app) -> None:
    app, _ = make_app(reader=MemoryReader({"u-1": TECH}))
    with TestClient(app) as client:
        response = select(client, request_id="req-1", context={"device": "mobile", "page_category": "tech"})
    assert response.status_code == 200
    body = response.json()
    SelectResponse.model_validate(body)  # the documented response model
    assert body["request_id"] == "req-1" and body["fallback"] is False and body["model_version"] == "projection-v1"
    assert [s["slot_id"] for s in body["slots"]] == ["top", "feed"]
    feed = body["slots"][1]["ads"]
    assert [a["rank"] for a in feed] == [1, 2]
    assert feed[0]["pctr"] * 0 == 0 and feed[0]["creative"]["landing_url"].startswith("https://")
    assert 0 < feed[0]["propensity"] <= 1 and feed[0]["price"] > 0


def test_a_started_app_hands_the_gil_back_to_requests_quickly(make_app, monkeypatch) -> None:
    """Background threads hold the GIL at most the switch interval while a request waits (runtime.start)."""
    calls: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", calls.append)  # the test process keeps its own
    app, _ = make_app(reader=MemoryReader())
    with TestClient(app):
        assert calls == [0.0005]  # Settings.gil_switch_interval_ms: a tenth of Python's 5 ms


def test_full_collections_are_timed_on_metrics(make_app) -> None:
    """Each full GC collection pauses the process: a started app counts and times them (adloop_gc_pause_seconds)."""
    app, _ = make_app(reader=MemoryReader())
    with TestClient(app) as client:
        before = _sample(client.get("/metrics").text, "adloop_gc_pause_seconds_count")
        gc.collect()
        gc.collect()
        assert _sample(client.get("/metrics").text, "adloop_gc_pause_seconds_count") >= before + 2


def _sample(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_openapi_has_the_example(make_app) -> None:
    app, _ = make_app()
    schema = app.openapi()["components"]["schemas"]["SelectRequest"]
    assert schema["examples"][0]["slots"][0]["format"] == "banner_728x90"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"slots": SLOTS}, "user_id"),
        ({"user_id": "u", "slots": [{"slot_id": "a", "format": "banner_1x1"}]}, "format"),
        ({"user_id": "u", "slots": []}, "slots"),
        ({"user_id": "u", "slots": [{"slot_id": "a", "format": "native", "count": 0}]}, "count"),
        ({"user_id": "u", "slots": SLOTS, "context": {"page": {"nested": 1}}}, "context"),
        ({"user_id": "", "slots": SLOTS}, "user_id"),
        ({"user_id": "u", "slots": SLOTS, "surprise": 1}, "surprise"),
    ],
)
def test_malformed_requests_name_the_field(make_app, body: dict, field: str) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        response = client.post("/v1/select", json=body)
    assert response.status_code == 422
    assert field in str(response.json()["detail"])


def test_a_repeated_slot_id_is_served_once(make_app) -> None:
    """The schema cannot say "unique slot ids", so the route takes them: the first slot of an id gets ads."""
    app, _ = make_app()
    with TestClient(app) as client:
        body = client.post("/v1/select", json={"user_id": "u", "slots": [{"slot_id": "a", "format": "native"}] * 2})
    assert body.status_code == 200
    assert [s["slot_id"] for s in body.json()["slots"]] == ["a", "a"]
    assert len(body.json()["slots"][0]["ads"]) == 1 and body.json()["slots"][1]["ads"] == []


def test_limits_name_the_field(make_app) -> None:
    app, _ = make_app(max_slots=2, max_candidate_ids=3)
    slots = [{"slot_id": f"s{i}", "format": "native"} for i in range(3)]
    with TestClient(app) as client:
        too_many = client.post("/v1/select", json={"user_id": "u", "slots": slots})
        too_long = select(client, candidate_ad_ids=["a", "b", "c", "d"])
        not_json = client.post("/v1/select", content=b"{", headers={"content-type": "application/json"})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "slots"]
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["body", "candidate_ad_ids"]
    assert not_json.status_code == 422


def test_candidate_restriction_through_the_api(make_app, catalog_rows) -> None:
    natives = [r["ad_id"] for r in catalog_rows if "native" in r["formats"] and r["end_date"] > "2027"][:3]
    app, _ = make_app()
    with TestClient(app) as client:
        body = client.post(
            "/v1/select",
            json={
                "user_id": "u",
                "slots": [{"slot_id": "a", "format": "native", "count": 5}],
                "candidate_ad_ids": natives,
                "exclude_ad_ids": natives[:1],
            },
        ).json()
    assert sorted(a["ad_id"] for a in body["slots"][0]["ads"]) == sorted(natives[1:])


def test_no_model_is_flagged_with_200(make_app) -> None:
    app, _ = make_app(registry=EmptyRegistry())
    with TestClient(app) as client:
        body = select(client).json()
    assert body["fallback"] is True and body["fallback_reason"] == "no_model"
    assert body["slots"][1]["ads"]


def test_a_failing_model_never_gives_a_500(make_app, bundle) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("model exploded")

    bundle.predict_ctr = boom
    app, _ = make_app(reader=MemoryReader({"u-1": TECH}))
    with TestClient(app) as client:
        response = select(client)
        metrics = client.get("/metrics").text
    assert response.status_code == 200 and response.json()["fallback_reason"] == "model_error"
    assert 'adloop_fallback_total{reason="model_error"}' in metrics


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
def test_redis_unreachable_falls_back_fast(make_app, feature_settings, topology: str) -> None:
    """No Redis answers (on a cluster, no node): the app still starts (its cluster clients open at first use),
    answers with the fallback and says so."""
    ports = [free_port() for _ in range(3)]
    nodes = {"redis_cluster_nodes": ",".join(f"127.0.0.1:{p}" for p in ports)} if topology == "cluster" else {}
    app, _ = make_app(reader=None, redis_url=f"redis://127.0.0.1:{ports[0]}/0", request_budget_ms=50,
                      feast_data_dir=feature_settings.feast_data_dir, **nodes)  # fmt: skip
    with TestClient(app) as client:
        started = time.perf_counter()
        bodies = [select(client).json() for _ in range(5)]
        elapsed = time.perf_counter() - started
        ready = client.get("/readyz")
        user = client.get("/v1/users/u-1/features", headers=ADMIN)
    assert all(b["fallback_reason"] == "redis_down" and b["slots"][1]["ads"] for b in bodies)
    assert elapsed < 2.0
    assert ready.status_code == 503 and ready.json()["checks"]["redis"]["ok"] is False
    assert user.status_code == 503


def test_slow_redis_is_cut_by_the_budget(make_app, feature_settings) -> None:
    feast_settings = feature_settings
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        # the app's own clients (the request path's is asyncio) against the silent port, Feast's registry
        app, _ = make_app(reader=None, redis_url=f"redis://127.0.0.1:{port}/0", request_budget_ms=30,
                          feast_data_dir=feast_settings.feast_data_dir)  # fmt: skip
        with TestClient(app) as client:
            started = time.perf_counter()
            bodies = [select(client).json() for _ in range(20)]
            elapsed = time.perf_counter() - started
    assert all(b["fallback_reason"] == "redis_slow" and b["slots"][0]["ads"] for b in bodies)
    assert elapsed < 0.5  # two 30 ms timeouts in a row, then the breaker skips Redis (not 20 x 30 ms)


@pytest.mark.integration
def test_real_redis_features_drive_frequency_caps(make_app, any_feature_settings, catalog_rows) -> None:
    """Through the app's own readers (Feast's layout in Redis; the routes' async HMGET), on standalone Redis and
    on Redis Cluster."""
    feature_settings = any_feature_settings
    client_redis = redis_client(feature_settings)
    layout = FeastLayout.from_settings(feature_settings)
    reader = OnlineFeatureReader(client_redis, layout)
    natives = [r for r in catalog_rows if r["formats"] == "native" and r["end_date"] > "2027"][:4]
    capped = natives[0]
    cap = int(capped["freq_cap_ad"]) or 1
    row = {**TECH, "freq_ad_ids": [capped["ad_id"]], "freq_ad_impressions_24h": [cap + 1]}
    write_rows(client_redis, layout, "user_activity", [("u-9", 1, row)])  # Feast's layout, as the consumer writes
    assert reader.user("u-9")["freq_ad_ids"] == [capped["ad_id"]]  # == Feast's read: tests/streaming
    app, _ = make_app(reader=None, **_redis_of(feature_settings))
    with TestClient(app) as client:
        body = client.post(
            "/v1/select",
            json={
                "user_id": "u-9",
                "slots": [{"slot_id": "a", "format": "native", "count": 4}],
                "candidate_ad_ids": [r["ad_id"] for r in natives],
            },
        ).json()
        features = client.get("/v1/users/u-9/features", headers=ADMIN).json()
        redis_check = client.get("/readyz").json()["checks"]["redis"]  # a cluster's PING goes to every node
    assert body["fallback"] is False
    served = {a["ad_id"] for a in body["slots"][0]["ads"]}
    assert capped["ad_id"] not in served and len(served) == 3
    assert features["known"] is True and features["features"]["freq_ad_ids"] == [capped["ad_id"]]
    assert redis_check == {"ok": True, "reason": None}


def test_admin_reload_needs_the_token(make_app) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        assert client.post("/v1/admin/reload").status_code == 401
        assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
        ok = client.post("/v1/admin/reload", headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and ok.json()["ads"] == 300
    disabled, _ = make_app(admin_token=None)
    with TestClient(disabled) as client:
        assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 403


def test_reload_under_load_drops_no_request(make_app, catalog_file, bundle) -> None:
    registry = StaticRegistry({bundle.version: bundle}, bundle.version)
    rows_b = generate_catalog(400, seed=11)
    other = ProjectionBundle(rows_b, version="projection-v2")
    registry.bundles[other.version] = other
    app, _ = make_app(registry=registry)
    auth = {"Authorization": "Bearer secret"}
    with TestClient(app) as client:

        def one(i: int) -> tuple[int, str, int]:
            r = client.post("/v1/select", json={"user_id": f"u{i}", "slots": SLOTS})
            body = r.json()
            return r.status_code, body.get("model_version", ""), sum(len(s["ads"]) for s in body.get("slots", []))

        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(one, i) for i in range(240)]
            for k in range(4):  # swap catalog file and model back and forth while requests run
                write_catalog(rows_b if k % 2 == 0 else generate_catalog(300, seed=7), catalog_file)
                registry.promote(other.version if k % 2 == 0 else bundle.version)
                assert client.post("/v1/admin/reload", headers=auth).status_code == 200
                time.sleep(0.05)
            results = [f.result(timeout=30) for f in futures]
        final = client.post("/v1/admin/reload", headers=auth).json()
    assert all(status == 200 for status, _, _ in results)
    assert all(n == 3 for _, _, n in results)  # every slot filled on either state
    assert {v for _, v, _ in results} <= {"projection-v1", "projection-v2"}
    assert final["ads"] == 300 and final["model_version"] == "projection-v1"


def test_bad_catalog_reload_keeps_serving(make_app, catalog_file) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        catalog_file.write_text("ad_id,campaign_id\nx,y\n")
        failed = client.post("/v1/admin/reload", headers={"Authorization": "Bearer secret"})
        still = select(client)
    assert failed.status_code == 422 and "missing columns" in failed.json()["detail"]
    assert still.status_code == 200 and still.json()["slots"][0]["ads"]


def test_ads_listing_and_ops_routes(make_app) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        listing = client.get("/v1/ads", params={"category": "tech", "format": "native", "limit": 5}).json()
        bad = client.get("/v1/ads", params={"limit": 0})
        health = client.get("/healthz")
        select(client)
        metrics = client.get("/metrics").text
    assert 0 < len(listing["ads"]) <= 5 and all(a["category"] == "tech" for a in listing["ads"])
    assert all("native" in a["formats"] for a in listing["ads"])
    assert bad.status_code == 422 and "limit" in str(bad.json()["detail"])
    assert health.json() == {"status": "ok"}
    for name in (
        "adloop_stage_seconds_bucket",
        "adloop_request_seconds",
        "adloop_impressions_total",
        'adloop_model_info{loaded="true",version="projection-v1"}',
        "adloop_catalog_ads",
    ):
        assert name in metrics


def test_catalog_file_change_is_picked_up_without_restart(make_app, catalog_file) -> None:
    app, _ = make_app(catalog_poll_s=0.1)
    with TestClient(app) as client:
        assert client.get("/v1/ads", params={"limit": 1}).json()["total"] == 300
        write_catalog(generate_catalog(120, seed=5), catalog_file)
        deadline = time.monotonic() + 5
        while client.get("/v1/ads", params={"limit": 1}).json()["total"] != 120 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/ads", params={"limit": 1}).json()["total"] == 120
        assert select(client).status_code == 200


def test_the_serving_heap_is_frozen_out_of_the_cyclic_gc(make_app) -> None:
    """A full collection over the catalog, model and libraries stalls every request (~160 ms measured by
    `python -m bench.gc_pause`): the app freezes what start-up built, and again after a reload."""
    import gc

    app, _ = make_app()
    gc.unfreeze()
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 10_000
        gc.unfreeze()
        assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer secret"}).status_code == 200
        assert gc.get_freeze_count() > 10_000
    gc.unfreeze()  # leave the test process as it was


@pytest.mark.integration
def test_live_outcomes_come_from_the_consumers_ad_counters_in_redis(make_app, any_feature_settings, catalog_rows):
    """Ad rows read back pipelined (a redis-py ClusterPipeline on a cluster: one batch per node)."""
    from features.aggregates import COARSE_BUCKET_MS, FINE_BUCKET_MS, ad_features

    feature_settings = any_feature_settings
    layout = FeastLayout.from_settings(feature_settings)
    now = int(time.time() * 1000)

    def row(last_ts: int, impressions: int, clicks: int) -> dict:
        counts = [impressions, clicks]
        hours, fine = {str(last_ts // COARSE_BUCKET_MS): counts}, {str(last_ts // FINE_BUCKET_MS): counts}
        return ad_features(hours, fine, last_ts)

    fresh, earlier, stale = (r["ad_id"] for r in catalog_rows[:3])
    write_rows(redis_client(feature_settings), layout, "ad_performance", [
        (fresh, now - 600_000, row(now - 600_000, 10, 2)),  # 10 min ago: in the last hour and day
        (earlier, now - 3 * 3_600_000, row(now - 3 * 3_600_000, 5, 1)),  # 3 h ago: the day only
        (stale, now - 3 * 86_400_000, row(now - 3 * 86_400_000, 7, 7)),  # 3 days ago: neither
    ])  # fmt: skip
    app, _ = make_app(reader=None, **_redis_of(feature_settings))
    with TestClient(app) as client:
        live = client.get("/v1/outcomes/live").json()
        one = client.get("/v1/outcomes/live", params={"campaign_id": catalog_rows[1]["campaign_id"]}).json()
    assert live["total"]["1h"] == {"impressions": 10, "clicks": 2, "ctr": 0.2}
    assert live["total"]["24h"] == {"impressions": 15, "clicks": 3, "ctr": 0.2}
    assert [a["ad_id"] for a in live["ads"]] == [fresh, earlier]
    assert one["total"]["24h"]["impressions"] == sum(
        n for ad, n in ((fresh, 10), (earlier, 5)) if catalog_rows[1]["campaign_id"] == _campaign(catalog_rows, ad)
    )


def _campaign(rows: list[dict], ad_id: str) -> str:
    return next(r["campaign_id"] for r in rows if r["ad_id"] == ad_id)
