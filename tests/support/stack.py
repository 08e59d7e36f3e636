"""Helpers for tests against the real local stack: send, consume and read back events; the shared data."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from adloop.settings import Settings
from adloop.stack import redis_cluster
from features.redis_client import redis_client
from streaming.consumer import FeatureConsumer
from streaming.events import Event

# ../shared/data beside the checkout; ADLOOP_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("ADLOOP_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test (saying why) where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (a fresh clone has no ../shared/data); this test needs the real data set")
    return path


# The consumer tests own this database and empty it per test; two suites running side by side on one
# machine (e.g. in two worktrees) must each set their own ADLOOP_TEST_REDIS_DB.
TEST_REDIS_DB = int(os.environ.get("ADLOOP_TEST_REDIS_DB", "3"))


def produce(
    settings: Settings, messages: list[Event | tuple[str | bytes | None, bytes]], topic: str | None = None
) -> None:
    """Send events (key = user id) or raw (key, value) pairs to `topic` (default: the events topic), in order."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", linger_ms=5)
    for message in messages:
        if isinstance(message, Event):
            key, value = message.user_id, message.to_bytes()
        else:
            key, value = message
        key = key.encode() if isinstance(key, str) else key
        producer.send(topic or settings.events_topic, key=key, value=value)
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
        "ADLOOP_REDIS_CLUSTER_NODES": settings.redis_cluster_nodes or "",
    }


def free_cluster_ports(n: int) -> list[int]:
    """Ports for a test cluster. Two suites side by side set ADLOOP_TEST_CLUSTER_PORT apart: a cluster has
    one database, emptied per test."""
    return redis_cluster.free_cluster_ports(n, int(os.environ.get("ADLOOP_TEST_CLUSTER_PORT", "17100")))


def _redis_port(settings: Settings) -> int:
    return redis.Redis.from_url(settings.redis_url).connection_pool.connection_kwargs.get("port", 6379)


def stored_offsets(settings: Settings, group: str = "adloop-features") -> dict[int, int]:
    """The consumer's applied offsets stored in Redis, per partition of the settings' events topic."""
    from streaming.state_store import StateStore

    store = StateStore(redis_client(settings), group=group, topic=settings.events_topic)
    return store.applied_offsets(range(settings.event_partitions))


def applied_events(settings: Settings, group: str = "adloop-features") -> int:
    """Records stored as applied (sum over partitions of last applied offset + 1); Redis must answer."""
    return sum(o + 1 for o in stored_offsets(settings, group).values())


def stop_when_applied(processes: list[subprocess.Popen], settings: Settings, expected: int,
                      timeout_s: float = 120.0) -> None:  # fmt: skip
    """SIGTERM `adloop consume` processes once `expected` records are stored as applied (or one exited), then
    wait for them: a graceful stop ends the batch in hand, so a test need not wait out an idle exit."""
    deadline = time.monotonic() + timeout_s
    while all(p.poll() is None for p in processes) and applied_events(settings) < expected:
        assert time.monotonic() < deadline, f"{applied_events(settings)} of {expected} applied after {timeout_s} s"
        time.sleep(0.1)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(timeout=60)


def consume_all(settings: Settings, expected: int, group: str = "test-features") -> Any:
    """Run a consumer until `expected` messages are accounted for (or 30 s pass with none arriving)."""
    consumer = FeatureConsumer(settings, redis_client=redis_client(settings), group=group)
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
