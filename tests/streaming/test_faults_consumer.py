"""Faults the feature consumer survives without losing or double-counting an event (real Kafka and Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import redis
from kafka import KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from prometheus_client import REGISTRY

from adloop.settings import Settings
from streaming.consumer import GROUP, FeatureConsumer, OffsetsAheadOfTopic
from streaming.dead_letters import describe
from streaming.state_store import PartitionBatch, StateStore
from tests.support.events import synthetic_events
from tests.support.stack import adloop_env, produce, stored_offsets

pytestmark = pytest.mark.integration


def _topic_config(settings: Settings, topic: str, **configs: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    admin.close()


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def test_a_dead_letter_the_broker_refuses_holds_the_batch_until_it_is_delivered(feature_settings: Settings) -> None:
    # The DLQ topic takes no message over 64 bytes: each dead-letter send fails at once (MESSAGE_TOO_LARGE).
    _topic_config(feature_settings, feature_settings.dlq_topic, **{"max.message.bytes": "64"})
    good = [e.model_copy(update={"user_id": "one-user"}) for e in synthetic_events(10, users=1, seed=4)]
    bad = json.dumps({"event_id": "bad", "user_id": "one-user", "note": "x" * 100}).encode()
    produce(feature_settings, [*good[:5], (b"one-user", bad), *good[5:]])  # one user: one partition, in order
    failures = "adloop_consumer_dead_letter_failures_total"
    before = REGISTRY.get_sample_value(failures) or 0
    client = redis.Redis.from_url(feature_settings.redis_url)
    consumer = FeatureConsumer(feature_settings, redis_client=client, group="faults")
    done = threading.Event()
    thread = threading.Thread(target=lambda: consumer.run(stop=lambda: consumer.total.handled >= 11 or done.is_set()))
    thread.start()
    try:
        _wait(lambda: (REGISTRY.get_sample_value(failures) or 0) >= before + 6, 90, "two refused batches")
        assert (
            consumer.state.applied_offsets(consumer.partitions) == {}
        )  # nothing of the batch is stored while its dead letter fails
        assert consumer.total.handled == 0
        _topic_config(feature_settings, feature_settings.dlq_topic, **{"max.message.bytes": "1048588"})
        thread.join(timeout=90)
        assert not thread.is_alive(), "the batch was not applied once its dead letter could be delivered"
    finally:
        done.set()
        thread.join(timeout=30)
    assert (consumer.total.applied, consumer.total.dead_lettered) == (10, {"schema": 1})
    letters = KafkaConsumer(feature_settings.dlq_topic, bootstrap_servers=feature_settings.kafka_bootstrap_servers,
                            auto_offset_reset="earliest", consumer_timeout_ms=3000)  # fmt: skip
    received = [(bytes(m.value), describe(m.headers)["reason"]) for m in letters]
    letters.close()
    assert received == [(bad, "schema")]  # delivered once the topic takes it, with its reason


def test_offsets_beyond_a_recreated_topic_stop_the_consumer_until_reset(feature_settings: Settings) -> None:
    events = synthetic_events(40, users=8, seed=9)
    produce(feature_settings, events)
    client = redis.Redis.from_url(feature_settings.redis_url)
    store = StateStore(client, group=GROUP, topic=feature_settings.events_topic)
    for p in range(feature_settings.event_partitions):  # left by the topic's former life
        store.commit(p, PartitionBatch(offset=5_000, expected=None))
    consumer = FeatureConsumer(feature_settings, redis_client=client)
    with pytest.raises(OffsetsAheadOfTopic, match=r"topic recreated\? .*adloop consume --reset-offsets"):
        consumer.run(idle_exit_s=10)
    assert stored_offsets(feature_settings) == dict.fromkeys(range(feature_settings.event_partitions), 5_000)

    env = {**os.environ, **adloop_env(feature_settings)}
    command = [
        sys.executable,
        "-m",
        "adloop.cli",
        "consume",
        "--reset-offsets",
        "--idle-exit",
        "3",
        "--metrics-port",
        "0",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forgot the applied offsets" in done.stdout and f"applied {len(events)}," in done.stdout
