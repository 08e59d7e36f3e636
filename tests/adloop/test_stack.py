"""The local stack: real Kafka and Redis, idempotent start, clear errors."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from adloop import stack
from adloop.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port held by a process that is not Kafka or Redis."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_up_twice_is_harmless(local_stack: Settings) -> None:
    first = {s.name: s for s in stack.status(local_stack)}
    again = {s.name: s for s in stack.up(local_stack)}
    assert all(s.running for s in again.values())
    for name in ("kafka", "redis"):
        assert again[name].pid == first[name].pid, f"{name} was restarted by a second `up`"
        assert again[name].since == first[name].since


def test_up_creates_the_topics(local_stack: Settings) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    try:
        topics = {t["name"]: t for t in admin.describe_topics([local_stack.events_topic, local_stack.dlq_topic])}
    finally:
        admin.close()
    assert len(topics[local_stack.events_topic]["partitions"]) == local_stack.event_partitions
    assert len(topics[local_stack.dlq_topic]["partitions"]) >= 1


def test_up_refuses_an_events_topic_with_another_partition_count(local_stack: Settings) -> None:
    from kafka.admin import KafkaAdminClient

    settings = local_stack.model_copy(update={"events_topic": f"adloop-test-partitions-{uuid.uuid4().hex[:8]}",
                                              "event_partitions": 3})  # fmt: skip
    stack.create_topics(settings)
    try:
        stack.create_topics(settings)  # the same count again: fine
        with pytest.raises(stack.StackError, match=r"has 3 partitions, but ADLOOP_EVENT_PARTITIONS=4"):
            stack.create_topics(settings.model_copy(update={"event_partitions": 4}))
    finally:
        admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers)
        admin.delete_topics([settings.events_topic])
        admin.close()


def test_redis_round_trip(local_stack: Settings) -> None:
    client = redis.Redis.from_url(local_stack.redis_url)
    client.set("adloop:test:round-trip", "ok", ex=60)
    assert client.get("adloop:test:round-trip") == b"ok"


def test_kafka_port_taken_gives_a_clear_error(tmp_path: Path, listening_port: int) -> None:
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{listening_port}", kafka_controller_port=_free_port(), stack_dir=tmp_path
    )
    with pytest.raises(stack.StackError, match=rf"Port 127.0.0.1:{listening_port} is taken.*ADLOOP_KAFKA"):
        stack.start_kafka(settings)


def test_redis_port_taken_gives_a_clear_error(tmp_path: Path, listening_port: int) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{listening_port}/0", stack_dir=tmp_path)
    with pytest.raises(stack.StackError, match=rf"Port 127.0.0.1:{listening_port} is taken.*ADLOOP_REDIS_URL"):
        stack.start_redis(settings)


def test_down_stops_only_what_up_started(tmp_path: Path) -> None:
    # A stack folder with no pid files: `down` must not touch the running services.
    settings = Settings(stack_dir=tmp_path)
    assert stack.down(settings) == []


def test_a_broker_that_fails_to_start_shows_its_log(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{_free_port()}",
        kafka_controller_port=_free_port(),
        stack_dir=tmp_path,
        kafka_heap="-Xmx1k",  # too small a heap: the JVM refuses to start
    )
    with pytest.raises(stack.StackError, match=r"exited with code .* Its log"):
        stack.start_kafka(settings)
