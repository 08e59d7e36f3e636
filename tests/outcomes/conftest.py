"""Outcome fixtures: a fresh events topic + dead-letter topic and a DuckDB file per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from adloop.settings import Settings
from streaming.events import Event


@pytest.fixture
def outcome_settings(local_stack: Settings, tmp_path) -> Iterator[Settings]:
    topic = f"adloop.test.outcomes.{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(topic + ".dlq", 1, 1)])
    yield local_stack.model_copy(
        update={
            "events_topic": topic,
            "dlq_topic": topic + ".dlq",
            "outcomes_path": tmp_path / "outcomes.duckdb",
            "report_dir": tmp_path / "report",
        }
    )
    admin.delete_topics([topic, topic + ".dlq"])
    admin.close()


def send(settings: Settings, messages: list[Event | tuple[str, bytes]], topic: str | None = None) -> None:
    """Events (key = user id) or raw (key, value) pairs to the events topic, flushed."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", linger_ms=5)
    for message in messages:
        if isinstance(message, Event):
            producer.send(topic or settings.events_topic, key=message.user_id.encode(), value=message.to_bytes())
        else:
            producer.send(topic or settings.events_topic, key=message[0].encode(), value=message[1])
    producer.flush(timeout=30)
    producer.close()
