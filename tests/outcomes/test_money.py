"""Money end to end on the real stack: a tracked click and a postback conversion travel through Kafka into
the outcomes store, attributed to their impression; spend equals the sum of charges; duplicates count once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import duckdb
import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from adloop.settings import Settings
from models.testing import EmptyRegistry
from outcomes.lander import OutcomeLander
from outcomes.store import OutcomeStore
from serving import signing
from serving.app import create_app
from serving.catalog import generate_catalog, write_catalog
from serving.pacing import LIFETIME_KEY
from serving.routes.conversions import sign_postback
from tests.support.serving import MemoryReader

pytestmark = pytest.mark.integration
SLOTS = [{"slot_id": "feed", "format": "native", "count": 2}]


def _catalog(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """Two native ads of a campaign unique to this test (the Redis ledger is shared): one CPC, one CPM."""
    tag = uuid.uuid4().hex[:8]
    rows = generate_catalog(2, seed=5)
    for i, row in enumerate(rows):
        row.update(ad_id=f"ad-{tag}-{i}", campaign_id=f"cmp-{tag}", formats="native", start_date="", end_date="",
                   daily_budget="0", freq_cap_ad="0", freq_cap_campaign="0", pricing=("cpc", "cpm")[i],
                   bid=("0.80", "12.0")[i])  # fmt: skip
    path = tmp_path / "ads.csv"
    write_catalog(rows, path)
    return path, rows


def _app(settings: Settings, tmp_path: Path, **overrides):
    catalog, rows = _catalog(tmp_path)
    settings = settings.model_copy(update={"catalog_path": catalog, "catalog_poll_s": 0, "ad_stats_refresh_s": 3600,
                                           "control_share": 0.0, "pacing_sync_s": 0, "stack_dir": tmp_path / "stack",
                                           **overrides})  # fmt: skip
    return create_app(settings, feature_reader=MemoryReader(), registry=EmptyRegistry()), settings, rows


def _convert(client: TestClient, secret: bytes, **fields) -> dict:
    body = orjson.dumps(fields)
    headers = {"X-Adloop-Signature": sign_postback(body, secret), "Content-Type": "application/json"}
    answer = client.post("/v1/conversions", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _won_rtb_bid(client: TestClient, user: str, exchange_id: str) -> tuple[dict, dict]:
    """One native OpenRTB bid for `user`, won at a $2.00 CPM and billed (the impression is logged): (bid, notice)."""
    native = orjson.dumps({"native": {"ver": "1.2", "assets": [{"id": 1, "title": {"len": 90}}]}}).decode()
    request = {"id": exchange_id, "imp": [{"id": "imp-1", "native": {"request": native}}],
               "site": {"id": "s-1", "domain": "news.example"}, "user": {"id": user}}  # fmt: skip
    answer = client.post("/openrtb/2.6/bid", json=request)
    assert answer.status_code == 200, answer.text
    (bid,) = answer.json()["seatbid"][0]["bid"]
    burl = urlsplit(bid["burl"].replace("${AUCTION_PRICE}", "2.0"))
    notice = dict(parse_qsl(burl.query))
    assert client.get(burl.path, params=notice).status_code == 204  # won and shown: the impression is logged
    return bid, notice


def _land(settings: Settings) -> OutcomeStore:
    store = OutcomeStore(settings.outcomes_path)
    OutcomeLander(settings, store).run(idle_exit_s=2.0)
    return store


def test_clicks_and_conversions_travel_through_kafka_attributed_to_their_impression(outcome_settings, tmp_path):
    app, settings, rows = _app(outcome_settings, tmp_path)
    user = f"u-{uuid.uuid4().hex[:8]}"
    with TestClient(app) as client:
        runtime = app.state.runtime
        answer = client.post("/v1/select", json={"user_id": user, "slots": SLOTS}).json()
        ads = {ad["ad_id"]: ad for ad in answer["slots"][0]["ads"]}
        assert set(ads) == {r["ad_id"] for r in rows}
        cpc, cpm = rows[0]["ad_id"], rows[1]["ad_id"]
        for ad_id in (cpm, cpc, cpc):  # the CPC ad clicked twice: counted and charged once
            hop = client.get(urlsplit(ads[ad_id]["click_url"]).path, follow_redirects=False)
            assert hop.status_code == 302 and hop.headers["location"] == ads[ad_id]["creative"]["landing_url"]
        last = _convert(client, runtime.secret, idempotency_key="order-1", user_id=user, value=30.0)
        assert last["attributed"] and (last["request_id"], last["ad_id"]) == (answer["request_id"], cpc)
        assert _convert(client, runtime.secret, idempotency_key="order-1", user_id=user, value=30.0)["duplicate"]
        named = _convert(client, runtime.secret, idempotency_key="order-2", click_id=ads_click_id(answer, cpm),
                         value=10.0)  # fmt: skip
        assert named["attributed"] and named["ad_id"] == cpm  # the click it names, not the user's last
        pixel = {"k": "order-3", "u": f"{user}-never-clicked", "value": "5"}
        pixel["sig"] = signing.sign(pixel, runtime.secret)
        gif = client.get("/v1/conversions/pixel", params=pixel)
        assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
        assert runtime.logger.flush(timeout=20)
        client_redis = redis.Redis.from_url(settings.redis_url)
        runtime.pacer.sync(client_redis)  # the charges reach the shared ledger
        charged = runtime.pacer.spent(cpc) + runtime.pacer.spent(cpm)
    store = _land(settings)
    total = store.outcomes()[0]
    assert (total["impressions"], total["clicks"], total["conversions"]) == (2, 2, 2)
    assert total["revenue"] == pytest.approx(40.0)
    expected_spend = 0.80 + 12.0 / 1000  # one CPC click + one CPM impression
    assert total["spend"] == pytest.approx(expected_spend) == pytest.approx(charged)
    ledger = store.spend()
    assert sum(r["spend"] for r in ledger) == pytest.approx(expected_spend)
    assert {r["arm"] for r in ledger} == {"targeted"} and {r["campaign"] for r in ledger} == {rows[0]["campaign_id"]}
    lifetime = client_redis.hmget(LIFETIME_KEY, [cpc, cpm])
    assert sum(float(v) for v in lifetime) == pytest.approx(expected_spend)  # Redis ledger = landed costs
    per_ad = {r["ad"]: r for r in store.outcomes(["ad"])}
    assert per_ad[cpc]["conversions"] == 1 and per_ad[cpc]["revenue"] == pytest.approx(30.0)
    assert per_ad[cpm]["conversions"] == 1 and per_ad[cpm]["roas"] == pytest.approx(10.0 / 0.012)
    assert total["cpa"] == pytest.approx(expected_spend / 2) and total["roas"] == pytest.approx(40.0 / expected_spend)
    assert store.unattributed() == {"conversions": 1, "revenue": 5.0}
    assert store.counts()["conversion"] == 3 and store.counts()["ad_click"] == 2


def test_an_openrtb_bid_carries_the_click_tracker_into_outcomes(outcome_settings, tmp_path):
    """Bid -> billing notice (the impression) -> click on the markup's link -> Kafka -> the outcomes store."""
    app, settings, rows = _app(outcome_settings, tmp_path)
    user, exchange_id = f"u-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with TestClient(app) as client:
        runtime = app.state.runtime
        bid, notice = _won_rtb_bid(client, user, exchange_id)
        click = urlsplit(orjson.loads(bid["adm"])["native"]["link"]["url"])
        assert f"{click.scheme}://{click.netloc}" == settings.public_url.rstrip("/")
        payload, sig = click.path.removeprefix("/c/").split(".")
        before = runtime.logger.counts["enqueued"]
        tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
        assert client.get(f"/c/{tampered}.{sig}", follow_redirects=False).status_code == 403
        assert runtime.logger.counts["enqueued"] == before  # a forged click logs nothing
        landing = next(r["landing_url"] for r in rows if r["ad_id"] == bid["adid"])
        for _ in range(2):  # clicked twice: one click
            hop = client.get(click.path, follow_redirects=False)
            assert hop.status_code == 302 and hop.headers["location"] == landing
        assert runtime.logger.flush(timeout=20)
    store = _land(settings)
    assert store.counts()["ad_click"] == 1
    (logged,) = store.logged()
    assert (logged["ad_id"], logged["arm"], logged["model_version"]) == (bid["adid"], notice["arm"], notice["v"])
    assert logged["clicked"] and logged["propensity"] == pytest.approx(float(notice["p"]))
    with duckdb.connect(str(settings.outcomes_path), read_only=True) as db:
        clicked = db.execute("SELECT request_id, ad_id, arm, model_version, slot_id, user_id FROM events "
                             "WHERE event_type = 'ad_click'").fetchall()  # fmt: skip
    assert clicked == [(exchange_id, bid["adid"], notice["arm"], notice["v"], "imp-1", user)]
    cpc = bid["adid"] == rows[0]["ad_id"]  # a CPC ad pays its bid on the click, a CPM ad the clearing price
    assert store.outcomes()[0]["spend"] == pytest.approx(0.80 if cpc else 2.0 / 1000)


def test_a_conversion_after_an_unclicked_rtb_impression_goes_to_it_under_last_impression(outcome_settings, tmp_path):
    app, settings, _ = _app(outcome_settings, tmp_path, attribution_model="impression")
    user, exchange_id = f"u-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with TestClient(app) as client:
        runtime = app.state.runtime
        bid, _ = _won_rtb_bid(client, user, exchange_id)
        deadline = time.monotonic() + 10
        while runtime.touches.last(user_id=user, click=None, model="impression") is None:  # written every 0.5 s
            assert time.monotonic() < deadline, "the RTB impression never became the user's last touch"
            time.sleep(0.1)
        answer = _convert(client, runtime.secret, idempotency_key=f"rtb-{user}", user_id=user, value=7.0)
        assert answer["attributed"] is True, answer
        assert runtime.logger.flush(timeout=20)
    store = _land(settings)
    with duckdb.connect(str(settings.outcomes_path), read_only=True) as db:
        (converted,) = db.execute("SELECT request_id, ad_id FROM events WHERE event_type = 'conversion'").fetchall()
    assert converted == (exchange_id, bid["adid"])
    assert store.unattributed() == {"conversions": 0, "revenue": 0.0}


def ads_click_id(answer: dict, ad_id: str) -> str:
    from serving.tracking import click_id

    return click_id(answer["request_id"], ad_id)


def test_a_conversion_after_the_window_is_landed_unattributed(outcome_settings, tmp_path):
    app, settings, _ = _app(outcome_settings, tmp_path, attribution_window_s=1.0)
    user = f"u-{uuid.uuid4().hex[:8]}"
    with TestClient(app) as client:
        runtime = app.state.runtime
        answer = client.post("/v1/select", json={"user_id": user, "slots": SLOTS}).json()
        ad = answer["slots"][0]["ads"][0]
        assert client.get(urlsplit(ad["click_url"]).path, follow_redirects=False).status_code == 302
        time.sleep(1.5)
        late = _convert(client, runtime.secret, idempotency_key=f"late-{user}", user_id=user, value=9.0)
        assert late["attributed"] is False and late["reason"] in ("expired", "no_touch")
        assert runtime.logger.flush(timeout=20)
        metrics = client.get("/metrics").text
    assert 'adloop_conversions_total{outcome="unattributed"}' in metrics
    store = _land(settings)
    assert store.outcomes()[0]["conversions"] == 0
    assert store.unattributed() == {"conversions": 1, "revenue": 9.0}
