"""Click tokens and the click / conversion routes' refusals (serving/tracking.py, routes/track.py, conversions.py)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from urllib.parse import urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient

from features.redis_client import redis_client
from serving import signing
from serving.routes.conversions import sign_postback
from serving.tracking import InvalidToken, Touch, TouchStore, click_id, decode_token, encode_token
from tests.support.serving import MemoryReader

SECRET = b"test-secret"
TOUCH = Touch("req-1", "ad-00001", "cmp-0001", "control", "v0003", 0.25, "u-7", "feed", 1_790_000_000_000)


def test_a_token_round_trips_and_an_edited_one_is_refused() -> None:
    token = encode_token(TOUCH, SECRET)
    assert decode_token(token, SECRET) == TOUCH
    assert len(token) < 200  # compact: fits a URL comfortably
    payload, sig = token.split(".")
    edited = encode_token(Touch(*[*vars(TOUCH).values()][:6], "u-8", "feed", TOUCH.ts_ms), SECRET).split(".")[0]
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    for forged in (f"{edited}.{sig}", f"{payload}.{flipped}", payload, "", f"{payload}.{sig}x"):
        with pytest.raises(InvalidToken):
            decode_token(forged, SECRET)
    with pytest.raises(InvalidToken):
        decode_token(token, b"another-secret")


def test_a_click_id_is_the_impressions() -> None:
    assert click_id("req-1", "ad-1") == click_id("req-1", "ad-1") != click_id("req-1", "ad-2")
    assert TOUCH.click_id == click_id("req-1", "ad-00001")


def test_forged_clicks_and_conversions_are_refused_and_log_nothing(make_app) -> None:
    app, _ = make_app(reader=MemoryReader())
    with TestClient(app) as client:
        runtime = app.state.runtime
        served = client.post("/v1/select", json={"user_id": "u-1", "slots": [{"slot_id": "s", "format": "native"}]})
        url = served.json()["slots"][0]["ads"][0]["click_url"]
        assert url.startswith(f"{runtime.settings.public_url}/c/")
        before = runtime.logger.buffered
        payload, sig = urlsplit(url).path.removeprefix("/c/").split(".")
        tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
        assert client.get(f"/c/{tampered}.{sig}", follow_redirects=False).status_code == 403
        body = orjson.dumps({"idempotency_key": "k", "user_id": "u-1", "value": 5.0})
        json_type = {"Content-Type": "application/json"}
        assert client.post("/v1/conversions", content=body, headers=json_type).status_code == 403  # unsigned
        wrong = {**json_type, "X-Adloop-Signature": sign_postback(body + b" ", runtime.secret)}
        assert client.post("/v1/conversions", content=body, headers=wrong).status_code == 403
        params = {"k": "k", "u": "u-1", "value": "5"}
        params["sig"] = signing.sign(params, runtime.secret)
        params["value"] = "500"  # edited after signing
        assert client.get("/v1/conversions/pixel", params=params).status_code == 403
        assert runtime.logger.buffered == before  # nothing logged
        good = sign_postback(body, runtime.secret)
        missing = orjson.dumps({"idempotency_key": "k2", "value": 1.0})
        headers = {**json_type, "X-Adloop-Signature": sign_postback(missing, runtime.secret)}
        assert client.post("/v1/conversions", content=missing, headers=headers).status_code == 422  # no one named
        euros = orjson.dumps({"idempotency_key": "k3", "user_id": "u-1", "value": 1.0, "currency": "EUR"})
        headers = {**json_type, "X-Adloop-Signature": sign_postback(euros, runtime.secret)}
        assert client.post("/v1/conversions", content=euros, headers=headers).status_code == 422
        assert good  # a correct signature is accepted: tests/outcomes/test_money.py


@pytest.mark.integration
def test_touches_are_shared_through_either_topology(any_feature_settings) -> None:
    """A click claimed once for every replica; the user's last click and last impression (the batch writer's
    pipeline: a ClusterPipeline on a cluster) readable by any of them."""
    first, second = (TouchStore(redis_client(any_feature_settings), window_s=60) for _ in range(2))
    clicked = replace(TOUCH, user_id=f"u-{uuid.uuid4().hex[:8]}")
    assert first.record_click(clicked) and not second.record_click(clicked)
    assert second.last(user_id=clicked.user_id, click=None, model="click") == clicked
    assert second.last(user_id=None, click=clicked.click_id, model="click") == clicked
    shown = [replace(TOUCH, user_id=f"u-{uuid.uuid4().hex[:8]}", request_id=f"req-{i}") for i in range(20)]
    first.remember_impressions(shown)
    stop = threading.Event()
    writer = threading.Thread(target=first.run, args=(stop, 0.01))
    writer.start()
    deadline = time.monotonic() + 10
    while second.last(user_id=shown[-1].user_id, click=None, model="impression") is None:
        assert time.monotonic() < deadline, "the impression touches were not written"
        time.sleep(0.02)
    stop.set()
    writer.join()
    assert [second.last(user_id=t.user_id, click=None, model="impression") for t in shown] == shown
    assert 0 < first.client.ttl(f"adloop:touch:user:impression:{shown[0].user_id}") <= 60
