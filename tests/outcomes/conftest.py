"""Outcome fixtures: a fresh events topic + dead-letter topic and a DuckDB file per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kafka import KafkaProducer

from adloop.runs.isolated import isolated_settings
from adloop.settings import Settings
from streaming.events import Event

OUTCOMES_REDIS_DB = 10  # emptied per test; no other suite's fixture uses it


@pytest.fixture
def outcome_settings(local_stack: Settings, tmp_path) -> Iterator[Settings]:
    with isolated_settings(local_stack, tmp_path, redis_db=OUTCOMES_REDIS_DB, prefix="adloop.test.outcomes",
                           partitions=3) as settings:  # fmt: skip
        yield settings


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
