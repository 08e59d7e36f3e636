"""Impressions reach a real Kafka topic as contract events; Kafka down never blocks or breaks serving."""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from kafka.errors import KafkaTimeoutError
from kafka.future import Future
from kafka.partitioner.default import DefaultPartitioner

from adloop.settings import Settings
from serving import impression_records, impressions
from serving.impression_records import encode, to_event
from serving.impressions import ImpressionLogger, kafka_producer
from streaming.events import Event, EventType, format_ts, parse_event
from tests.support.serving import MemoryReader, free_port
from tests.support.stack import read_back

TECH = {"top_categories": ["tech"], "top_category_scores": [1.0]}
SLOTS = [
    {"slot_id": "top", "format": "banner_728x90", "position": 0},
    {"slot_id": "feed", "format": "native", "count": 2},
]


@pytest.mark.integration
def test_served_ads_arrive_on_kafka_as_contract_events(
    make_app, catalog_rows, local_stack: Settings, topic: str
) -> None:
    app, _ = make_app(
        reader=MemoryReader({f"u{i}": TECH for i in range(4)}),
        events_topic=topic,
        producer_factory=lambda: kafka_producer(local_stack),
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
    cluster = Cluster(topic, 3)
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
        assert message.partition == DefaultPartitioner().partition(topic, None, message.key, None, None, cluster)


def test_kafka_down_buffers_counts_and_drops_oldest() -> None:
    logger = ImpressionLogger(
        topic="unused",
        buffer_size=5,
        retry_s=60,
        producer_factory=lambda: kafka_producer(Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")),
    )
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
    app, _ = make_app(
        producer_factory=lambda: kafka_producer(Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"))
    )
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


# --- encode: the contract's bytes without building an Event ----------------------------------

UNICODE = ["u", "Zoë", "東京", "emoji 🎯", 'quote " back \\ slash', "tab\tnew\nline", "nul\x00", "é" * 256, "x" * 256]


def varied_records(n: int, seed: int = 11) -> list[dict]:
    """Impression records as `impression_records` builds them, and many it never builds but might."""
    rng = random.Random(seed)
    values = [None, *UNICODE, 0, -7, 2**62, True, False, 0.0, -1.5, 1e300, 5e-324, 0.1 + 0.2]
    records = []
    for i in range(n):
        record = {
            "event_id": rng.choice([f"e{i}", "", None, "é" * 256]),
            "user_id": rng.choice(UNICODE),
            "ad_id": rng.choice(UNICODE),
            "ts": rng.choice([946_684_800_000, 1_764_000_000_000 + i, 1_764_000_000_999, 4_102_444_799_999]),
        }
        for name in ("campaign_id", "category", "request_id", "slot_id", "model_version"):
            if rng.random() < 0.8:
                record[name] = rng.choice([None, *UNICODE])
        if rng.random() < 0.8:
            record["position"] = rng.choice([None, 0, 1, 2, 10**12])
        if rng.random() < 0.8:
            record["arm"] = rng.choice([None, "targeted", "control"])
        if rng.random() < 0.8:
            record["propensity"] = rng.choice([None, 1.0, 1e-7, 5e-324, 0.1 + 0.2, rng.random() or 0.5, 1 / 3])
        if rng.random() < 0.8:
            record["context"] = rng.choice([None, {}, {rng.choice(UNICODE): rng.choice(values) for _ in range(4)}])
        records.append(record)
    return records


def assert_same_event(record: dict) -> None:
    key, value = encode(record)
    expected = to_event(record).model_dump()
    got = parse_event(value).model_dump()
    if not record.get("event_id"):  # both draw a fresh uuid
        assert len(got.pop("event_id")) == 32 and len(expected.pop("event_id")) == 32
    assert got == expected
    assert key == record["user_id"].encode()


def test_encoded_bytes_parse_into_the_event_to_event_gives() -> None:
    records = varied_records(3000)
    for record in records:
        assert_same_event(record)
    fast = sum(impression_records._checked(r) is not None for r in records)
    assert fast > 2000  # most of them took the fast path: it is what is being checked


def test_records_off_the_fast_path_go_out_as_before() -> None:
    """What the checks do not accept is written by `Event.to_bytes`, byte for byte as on main."""
    base = {"event_id": "e", "user_id": "u", "ad_id": "a", "ts": 1_764_000_000_000}
    odd = [
        {**base, "ts": 1_764_000_000_000.4},  # float ms
        {**base, "ts": 86_400_000},  # 1970
        {**base, "ts": 32_503_680_000_000},  # year 3000
        {**base, "propensity": 1},  # an int
        {**base, "position": True},
        {**base, "context": {"nan": math.nan, "inf": math.inf}},
        {**base, "context": {"big": 2**64}},
    ]
    for record in odd:
        assert impression_records._checked(record) is None
        assert encode(record) == (b"u", to_event(record).to_bytes())


@pytest.mark.parametrize(
    "change",
    [
        {"user_id": ""},
        {"user_id": "x" * 257},
        {"ad_id": None},
        {"campaign_id": ""},
        {"position": -1},
        {"propensity": 0.0},
        {"propensity": 1.5},
        {"propensity": math.nan},
        {"arm": "other"},
        {"context": {"nested": {"a": 1}}},
        {"context": {"list": [1]}},
        {"context": {1: "int key"}},
        {"user_id": "lone \ud800 surrogate"},
        {"context": {"k": "lone \udfff surrogate"}},
    ],
)
def test_records_that_break_the_contract_are_refused(change: dict) -> None:
    record = {"event_id": "e", "user_id": "u", "ad_id": "a", "ts": 1_764_000_000_000, **change}
    with pytest.raises(Exception):  # noqa: B017 (pydantic, orjson or a UnicodeEncodeError: each is a refusal)
        encode(record)


def test_missing_required_fields_are_refused() -> None:
    for name in ("user_id", "ad_id", "ts"):
        record = {"event_id": "e", "user_id": "u", "ad_id": "a", "ts": 1_764_000_000_000}
        del record[name]
        with pytest.raises((KeyError, ValueError)):
            encode(record)


def test_the_fast_path_knows_the_contract() -> None:
    """A field or a bound changed in the contract fails here until `encode`'s checks follow it."""
    optional = [name for name, _ in impression_records.OPTIONAL_FIELDS]
    written = ["event_id", "schema_version", "event_type", "user_id", "ts", *optional, "source", "context", "cost"]
    never_set = ["session_id", "item_id", "brand", "price", "value", "currency"]  # impressions carry no value
    assert sorted(Event.model_fields) == sorted(written + never_set)
    assert optional == [f for f in Event.model_fields if f in optional]  # keys in the contract's order
    fields = Event.model_json_schema()["properties"]
    ids = ["event_id", "user_id", "category", "ad_id", "campaign_id", "request_id", "slot_id", "model_version"]
    for name in ids:
        bounds = fields[name]["anyOf"][0] if "anyOf" in fields[name] else fields[name]
        assert (bounds["minLength"], bounds["maxLength"]) == (1, impression_records.MAX_ID), name
    assert fields["position"]["anyOf"][0] == {"type": "integer", "minimum": 0}
    assert fields["propensity"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert fields["arm"]["anyOf"][0]["enum"] == ["targeted", "control"]
    assert fields["cost"]["anyOf"][0] == {"type": "number", "minimum": 0}
    context = fields["context"]["anyOf"][0]["additionalProperties"]["anyOf"]
    assert [c["type"] for c in context] == ["string", "integer", "number", "boolean", "null"]


def test_timestamps_are_written_as_to_bytes_writes_them() -> None:
    rng = random.Random(3)
    low, high = impression_records.FAST_TS_MS
    for ts in [low, high - 1, *(rng.randrange(low, high) for _ in range(20_000))]:
        event_ts = datetime.fromtimestamp(ts / 1000, tz=UTC)
        assert format_ts(ts) == event_ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert event_ts.microsecond == ts % 1000 * 1000  # nothing below the ms is lost in the text


def test_served_records_take_the_fast_path(make_app) -> None:
    app, _ = make_app(reader=MemoryReader({"u0": TECH}))
    with TestClient(app) as client:
        for i in range(3):
            body = {"user_id": f"u{i}", "slots": SLOTS, "context": {"device": "mobile", "country": "DE", "n": 1}}
            assert client.post("/v1/select", json=body).status_code == 200
        records = list(app.state.runtime.logger._buffer)
    assert len(records) == 9
    for record in records:
        assert impression_records._checked(record) is not None
        assert_same_event(record)


class FakeProducer:
    """Delivers at once; records what it was given."""

    def __init__(self, error: Exception | None = None):
        self.sent: list[tuple] = []
        self.error = error

    def partitions_for(self, topic):
        return {0, 1, 2}

    def send(self, topic, *, key=None, value, partition=None, headers=None):
        self.sent.append((topic, key, value, partition, headers))
        return Future().failure(self.error) if self.error else Future().success(None)

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        pass


def test_a_record_that_breaks_the_contract_is_counted_and_the_rest_go_out() -> None:
    producer = FakeProducer()
    logger = ImpressionLogger(topic="t", producer_factory=lambda: producer)
    logger.start()
    good = {"user_id": "u", "ad_id": "a", "propensity": 0.5}
    logger.log([{**good, "event_id": "e1"}, {**good, "event_id": "e2", "position": -1}, {**good, "event_id": "e3"}])
    assert logger.flush(timeout=5)
    logger.log([{**good, "event_id": "e4"}])  # the thread is still alive
    assert logger.flush(timeout=5)
    logger.close(timeout=1)
    events = [(topic, value) for topic, _, value, _, _ in producer.sent]
    assert [parse_event(value).event_id for topic, value in events if topic == "t"] == ["e1", "e3", "e4"]
    dead = [(value, dict(headers)) for topic, _, value, _, headers in producer.sent if topic == "t.dlq"]
    assert len(dead) == 1 and dead[0][1]["adloop.reason"] == b"unencodable" and b'"e2"' in dead[0][0]
    assert (logger.counts["dead_lettered"], logger.counts["sent"]) == (1, 3)


class Cluster:
    """What kafka-python's `DefaultPartitioner` reads of the cluster metadata: one topic's partitions."""

    def __init__(self, topic: str, n: int):
        self.topic, self.partitions = topic, set(range(n))

    def topics(self):
        return {self.topic}

    def partitions_for_topic(self, topic):
        return self.partitions

    def available_partitions_for_topic(self, topic):
        return self.partitions


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12])
def test_our_partition_is_the_default_partitioners(n: int) -> None:
    cluster = Cluster("t", n)
    rng = random.Random(n)
    keys = [u.encode() for u in UNICODE] + [f"user-{rng.randrange(10**9)}".encode() for _ in range(3000)]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(1000)]  # every tail length
    default = DefaultPartitioner()
    for key in keys:
        assert impression_records.partition(key, list(range(n))) == default.partition(
            "t", None, key, None, None, cluster
        )


def test_refused_deliveries_are_dead_lettered_and_counted_and_flagged() -> None:
    producer = FakeProducer(error=ValueError("refused for good"))  # not retriable; its dead letters fail too
    logger = ImpressionLogger(topic="t", producer_factory=lambda: producer)
    logger.start()
    logger.log([{"user_id": "u", "ad_id": "a", "event_id": f"e{i}"} for i in range(3)])
    logger.flush(timeout=5)
    logger.close(timeout=1)
    assert logger.counts["lost"] == 3 and logger.counts["sent"] == 0  # each one counted, and logged by id
    assert not logger.connected and logger.last_error == "delivery: refused for good"
    assert [p for topic, *_, p, _ in producer.sent if topic == "t"] == [
        impression_records.partition(b"u", [0, 1, 2])
    ] * 3
    assert sum(topic == "t.dlq" for topic, *_ in producer.sent) == 3


def test_an_expired_delivery_goes_back_into_the_buffer_and_out_again() -> None:
    producer = FakeProducer(error=KafkaTimeoutError("batch expired"))
    logger = ImpressionLogger(topic="t", producer_factory=lambda: producer, buffer_size=2)
    logger.log([{"user_id": "u", "ad_id": "a", "event_id": f"e{i}"} for i in range(2)])
    logger._producer = producer
    logger._drain()
    assert logger.counts["requeued"] == 2 and [r["event_id"] for r in logger._buffer] == ["e0", "e1"]
    logger.log([{"user_id": "u", "ad_id": "a", "event_id": "e2"}])  # beyond the bound: the oldest is dropped
    assert logger.counts["dropped_buffer_full"] == 1 and [r["event_id"] for r in logger._buffer] == ["e1", "e2"]
    producer.error = None  # Kafka is back
    logger._drain()
    assert logger.counts["sent"] == 2 and not logger._buffer and logger._dropped_ids == ["e0"]


def test_deliveries_are_counted_whatever_order_they_finish_in() -> None:
    logger = ImpressionLogger(topic="t", producer_factory=lambda: None)
    slow = Future()  # e.g. a partition whose leader is away
    futures = [slow, Future().success(None), Future().failure(KafkaTimeoutError("x")), Future()]
    logger._pending.extend((f, {"event_id": f"e{i}"}, f"e{i}", time.monotonic()) for i, f in enumerate(futures))
    logger._reap()
    assert logger.counts["sent"] == 1 and logger.counts["requeued"] == 1 and len(logger._pending) == 2
    slow.success(None)
    logger._reap()
    assert logger.counts["sent"] == 2 and logger.counts["requeued"] == 1 and len(logger._pending) == 1


@pytest.mark.parametrize(
    ("context", "reason"),
    [({"blob": "x" * 5 * 1024 * 1024}, "oversized"), ({"text": "\ud800"}, "unencodable")],  # 5 MiB; a lone surrogate
)
def test_an_oversized_or_unencodable_impression_is_dead_lettered_and_never_blocks_the_rest(context, reason) -> None:
    producer = FakeProducer()
    logger = ImpressionLogger(topic="t", producer_factory=lambda: producer)
    good = {"user_id": "u", "ad_id": "a"}
    logger.log(
        [{**good, "event_id": "e1"}, {**good, "event_id": "bad", "context": context}, {**good, "event_id": "e3"}]
    )
    logger._producer = producer
    logger._drain()
    logger._drain()  # nothing left to retry
    assert [parse_event(v).event_id for topic, _, v, _, _ in producer.sent if topic == "t"] == ["e1", "e3"]
    [(value, headers)] = [(v, dict(h)) for topic, _, v, _, h in producer.sent if topic == "t.dlq"]
    assert headers["adloop.reason"] == reason.encode() and headers["adloop.event_id"] == b"bad"
    assert len(value) <= impressions.DEAD_LETTER_SAMPLE_BYTES
    assert (logger.counts["sent"], logger.counts["dead_lettered"], len(logger._buffer)) == (2, 1, 0)


def test_shutdown_is_bounded_and_counts_what_stayed_unsent() -> None:
    logger = ImpressionLogger(
        topic="t", producer_factory=lambda: kafka_producer(Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"))
    )
    logger.start()
    logger.log([{"user_id": "u", "ad_id": "a", "event_id": f"e{i}"} for i in range(4)])
    started = time.monotonic()
    logger.close(timeout=1.0)
    assert time.monotonic() - started < 2.5
    assert logger.counts["unsent_at_shutdown"] == 4 and logger.buffered == 0
