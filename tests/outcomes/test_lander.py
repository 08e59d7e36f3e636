"""The outcomes lander against the real Kafka broker and a real DuckDB file."""

from __future__ import annotations

from datetime import timedelta

import pytest

from outcomes.lander import OutcomeLander
from outcomes.store import Filters, OutcomeStore
from streaming.events import Event, EventType
from tests.support.events import IMPRESSION_T0 as T0
from tests.support.events import impression
from tests.support.stack import produce

pytestmark = pytest.mark.integration


def test_counts_equal_the_events_produced_and_a_replay_counts_once(outcome_settings):
    events, clicks = [], 0
    for i in range(60):
        clicked = i % 4 == 0
        clicks += clicked
        events += impression(i, arm="control" if i % 5 == 0 else "targeted", clicked=clicked, minute=i // 20)
    first = events[0]
    conversion = first.model_copy(update={"event_id": "conv-0", "event_type": EventType.conversion, "price": 30.0})
    events.append(conversion)  # joins impression 0 by request_id + ad_id
    browsing = Event(event_id="pv-1", schema_version=1, event_type=EventType.page_view, user_id="u1", ts=T0)
    produce(outcome_settings, [*events, browsing, ("u1", b"{not json")])
    produce(outcome_settings, [("u1", b"{not json")], topic=outcome_settings.dlq_topic)

    store = OutcomeStore(outcome_settings.outcomes_path)
    report = OutcomeLander(outcome_settings, store).run(idle_exit_s=2.0)
    assert (report.landed, report.skipped, report.invalid, report.dead_letters) == (61 + clicks, 1, 1, 1)
    total = store.outcomes()[0]
    assert (total["impressions"], total["clicks"], total["conversions"]) == (60, clicks, 1)
    counts = store.counts()
    assert (counts["dlq:unknown"], counts["dlq:invalid_json"]) == (1, 1)  # one without headers, one the lander read

    # the same events again, read by a fresh group from the start: nothing counts twice
    produce(outcome_settings, events)
    again = OutcomeLander(outcome_settings, store, group="adloop-outcomes-test-2").run(idle_exit_s=2.0)
    assert again.landed == 0 and again.duplicates == 2 * (61 + clicks)
    assert store.outcomes()[0]["impressions"] == 60

    by_arm = {r["arm"]: r for r in store.outcomes(["arm"])}
    assert by_arm["control"]["impressions"] == 12 and by_arm["control"]["clicks"] == 3  # i = 0, 20, 40
    by_minute = store.outcomes(["minute"])
    assert [r["minute"] for r in by_minute] == ["2026-01-05T08:00:00Z", "2026-01-05T08:01:00Z", "2026-01-05T08:02:00Z"]
    assert [r["impressions"] for r in by_minute] == [20, 20, 20]
    only = store.outcomes(["campaign", "model_version"], Filters(arm="targeted", start=T0 + timedelta(minutes=1)))
    assert sum(r["impressions"] for r in only) == 40 - 8
    segments = store.outcomes(["segment"])
    assert {r["segment"].split("/")[1] for r in segments} == {"mobile", "desktop"}
    assert sum(r["impressions"] for r in segments) == 60


def test_store_counts_a_repeated_event_id_once_within_and_across_batches(tmp_path):
    store = OutcomeStore(tmp_path / "o.duckdb")
    store.setup()
    events = [e for i in range(3) for e in impression(i, arm="targeted", clicked=True)]
    assert store.write([*events, *events]) == 6  # the first copy of each id counts
    assert store.write(events) == 0
    total = store.outcomes()[0]
    assert (total["impressions"], total["clicks"], total["ctr"]) == (3, 3, 1.0)
    assert store.outcomes(["arm"], Filters(arm="control")) == []


def test_an_unreadable_event_is_one_dead_letter_with_its_reason_and_metric(outcome_settings):
    from kafka import KafkaProducer
    from prometheus_client import REGISTRY

    metric = "adloop_outcomes_dead_lettered_total"
    before = REGISTRY.get_sample_value(metric, {"reason": "invalid_json"}) or 0
    producer = KafkaProducer(bootstrap_servers=outcome_settings.kafka_bootstrap_servers, acks="all")
    producer.send(outcome_settings.events_topic, key=b"u1", value=b"{not json", partition=0).get(timeout=10)
    headers = [
        ("adloop.reason", b"invalid_json"),
        ("adloop.source.topic", outcome_settings.events_topic.encode()),
        ("adloop.source.partition", b"0"),
        ("adloop.source.offset", b"0"),
    ]  # as the feature consumer sends it
    producer.send(outcome_settings.dlq_topic, key=b"u1", value=b"{not json", headers=headers).get(timeout=10)
    producer.close()

    store = OutcomeStore(outcome_settings.outcomes_path)
    report = OutcomeLander(outcome_settings, store).run(idle_exit_s=2.0)
    assert (report.invalid, report.dead_letters, report.landed) == (1, 1, 0)
    assert store.counts() == {"dlq:invalid_json": 1}  # read by both, recorded once, with its reason
    assert REGISTRY.get_sample_value(metric, {"reason": "invalid_json"}) == before + 1
