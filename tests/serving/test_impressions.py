"""Impressions reach a real Kafka topic as contract events; Kafka down never blocks or breaks serving."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from adloop.settings import Settings
from serving.impressions import ImpressionLogger, to_event
from streaming.events import EventType, parse_event
from tests.conftest import read_back
from tests.serving.conftest import MemoryReader, free_port

TECH = {"top_categories": ["tech"], "top_category_scores": [1.0]}
SLOTS = [
    {"slot_id": "top", "format": "banner_728x90", "position": 0},
    {"slot_id": "feed", "format": "native", "count": 2},
]


@pytest.mark.integration
def test_served_ads_arrive_on_kafka_as_contract_events(
    make_app, catalog_rows, local_stack: Settings, topic: str
) -> None:
    from serving.impressions import _kafka_producer

    app, _ = make_app(
        reader=MemoryReader({f"u{i}": TECH for i in range(4)}),
        events_topic=topic,
        producer_factory=lambda: _kafka_producer(local_stack.kafka_bootstrap_servers),
        control_share=0.5,
    )
    with TestClient(app) as client:
        bodies = [
            client.post(
                "/v1/select",
                json={
                    "request_id": f"req-{i}",
                    "user_id": f"u{i}",
                    "slots": SLOTS,
                    "context": {"device": "mobile", "country": "DE"},
                },
            ).json()
            for i in range(4)
        ]
        assert app.state.runtime.logger.flush(timeout=15)
    categories = {row["ad_id"]: row["category"] for row in catalog_rows}
    served = {(b["request_id"], s["slot_id"], a["ad_id"]): (b, a) for b in bodies for s in b["slots"] for a in s["ads"]}
    assert len(served) == 12
    messages = read_back(local_stack, topic, len(served))
    events = [parse_event(m.value) for m in messages]
    assert len(events) == len(served)
    assert len({e.event_id for e in events}) == len(events)
    for message, event in zip(messages, events, strict=True):
        assert event.event_type == EventType.ad_impression
        assert message.key == event.user_id.encode()
        body, ad = served[(event.request_id, event.slot_id, event.ad_id)]
        assert event.campaign_id == ad["campaign_id"] and event.position == ad["rank"]
        # the ranker learns user-by-category affinity from these rows: the category must travel with them
        assert event.category == categories[event.ad_id] and event.context["advertiser_id"]
        assert event.arm == body["arm"] and event.model_version == body["model_version"]
        assert event.propensity == pytest.approx(ad["propensity"])
        assert event.context["device"] == "mobile" and event.context["format"] in ("banner_728x90", "native")


def test_kafka_down_buffers_counts_and_drops_oldest() -> None:
    logger = ImpressionLogger(bootstrap_servers=f"127.0.0.1:{free_port()}", topic="unused", buffer_size=5, retry_s=60)
    logger.start()  # starts although no broker answers
    record = {
        "user_id": "u",
        "ad_id": "a",
        "campaign_id": "c",
        "request_id": "r",
        "slot_id": "s",
        "position": 1,
        "model_version": "m",
        "arm": "targeted",
        "propensity": 0.5,
        "context": {"device": "x"},
    }
    started = time.perf_counter()
    for i in range(8):
        logger.log([{**record, "event_id": f"e{i}"}])
    assert time.perf_counter() - started < 0.05  # never waits for Kafka
    assert logger.counts["enqueued"] == 8 and logger.counts["dropped_buffer_full"] == 3
    assert [r["event_id"] for r in logger._buffer] == [f"e{i}" for i in range(3, 8)]  # the newest survive
    assert not logger.connected
    logger.close(timeout=0.5)


def test_app_serves_while_kafka_is_down(make_app) -> None:
    from serving.impressions import _kafka_producer

    app, _ = make_app(producer_factory=lambda: _kafka_producer(f"127.0.0.1:{free_port()}"))
    with TestClient(app) as client:
        started = time.perf_counter()
        responses = [client.post("/v1/select", json={"user_id": f"u{i}", "slots": SLOTS}) for i in range(5)]
        elapsed = time.perf_counter() - started
        ready = client.get("/readyz").json()
        metrics = client.get("/metrics").text
    assert all(r.status_code == 200 and r.json()["slots"][1]["ads"] for r in responses)
    assert elapsed < 1.0
    assert ready["checks"]["kafka"]["ok"] is False and ready["checks"]["kafka"]["buffered"] >= 15
    assert "adloop_impressions_buffered" in metrics


def test_records_are_contract_events() -> None:
    event = to_event(
        {
            "user_id": "u",
            "ad_id": "a",
            "ts": 1_764_000_000_000,
            "arm": "control",
            "category": "books",
            "propensity": 0.01,
            "context": {"format": "native", "slot_position": 2},
        }
    )
    assert parse_event(event.to_bytes()) == event
    assert event.category == "books"
