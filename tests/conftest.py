"""Shared fixtures: the real local stack (Kafka + Redis), started once per test session."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from adloop import stack
from adloop.runs.isolated import isolated_settings
from adloop.settings import Settings, get_settings
from streaming.consumer import FeatureConsumer
from streaming.events import Event

# ../shared/data beside the checkout; ADLOOP_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("ADLOOP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def local_stack(settings: Settings) -> Settings:
    """Kafka and Redis up (started if needed, as `adloop stack up` does); fails saying how to start them."""
    try:
        stack.up(settings)
    except stack.StackError as error:
        pytest.fail(f"The local stack could not start ({error}). Start it with `make stack` or `adloop stack up`.")
    return settings


@pytest.fixture
def topic(local_stack: Settings) -> Iterator[str]:
    """A fresh single-use topic, deleted afterwards."""

    name = f"adloop.test.{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(name, 3, 1)])
    yield name
    admin.delete_topics([name])
    admin.close()


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test (saying why) where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (a fresh clone has no ../shared/data); this test needs the real data set")
    return path


# The consumer tests own this database and empty it per test; two suites running side by side on one
# machine (e.g. in two worktrees) must each set their own ADLOOP_TEST_REDIS_DB.
TEST_REDIS_DB = int(os.environ.get("ADLOOP_TEST_REDIS_DB", "3"))


@pytest.fixture
def feature_settings(local_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    with isolated_settings(
        local_stack, tmp_path, redis_db=TEST_REDIS_DB, prefix="adloop.test.events", consumer_batch_size=250
    ) as settings:
        yield settings


def produce(settings: Settings, messages: list[Event | tuple[bytes | None, bytes]]) -> None:
    """Send events (key = user id) or raw (key, value) pairs to the settings' events topic, in order."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", linger_ms=5)
    for message in messages:
        if isinstance(message, Event):
            producer.send(settings.events_topic, key=message.user_id.encode(), value=message.to_bytes())
        else:
            producer.send(settings.events_topic, key=message[0], value=message[1])
    producer.flush(timeout=30)
    producer.close()


def adloop_env(settings: Settings) -> dict[str, str]:
    """ADLOOP_* variables that make a subprocess use these settings."""
    return {
        "ADLOOP_EVENTS_TOPIC": settings.events_topic,
        "ADLOOP_DLQ_TOPIC": settings.dlq_topic,
        "ADLOOP_REDIS_URL": settings.redis_url,
        "ADLOOP_FEAST_DATA_DIR": str(settings.feast_data_dir),
        "ADLOOP_CONSUMER_BATCH_SIZE": str(settings.consumer_batch_size),
        "ADLOOP_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
    }


def _redis_port(settings: Settings) -> int:
    return redis.Redis.from_url(settings.redis_url).connection_pool.connection_kwargs.get("port", 6379)


def consume_all(settings: Settings, expected: int, group: str = "test-features") -> Any:
    """Run a consumer until `expected` messages are accounted for (or 30 s pass with none arriving)."""
    consumer = FeatureConsumer(settings, redis_client=redis.Redis.from_url(settings.redis_url), group=group)
    return consumer.run(stop=lambda: consumer.total.handled >= expected, idle_exit_s=30)


def read_back(settings: Settings, topic: str, n: int, timeout_s: float = 15.0) -> list[Any]:
    """Up to `n` records of `topic` from the beginning (kafka-python ConsumerRecords), waiting at most `timeout_s`."""
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=1000)  # fmt: skip
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < n and time.monotonic() < deadline:
        messages.extend(consumer)
    consumer.close()
    return messages[:n] if len(messages) > n else messages
