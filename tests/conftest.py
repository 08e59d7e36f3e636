"""Shared fixtures: the real local stack (Kafka + Redis), started once per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from adloop import stack
from adloop.runs.isolated import isolated_settings
from adloop.settings import Settings, get_settings
from tests.support.stack import TEST_REDIS_DB


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


@pytest.fixture
def feature_settings(local_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    with isolated_settings(
        local_stack, tmp_path, redis_db=TEST_REDIS_DB, prefix="adloop.test.events", consumer_batch_size=250
    ) as settings:
        yield settings
