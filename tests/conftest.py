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
from adloop.stack import redis_cluster
from tests.support.stack import TEST_REDIS_DB, free_cluster_ports


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


@pytest.fixture(scope="session")
def cluster_stack(local_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The local stack with a real 3-master Redis Cluster of this test session's own instead of standalone Redis."""
    ports = free_cluster_ports(3)
    settings = local_stack.model_copy(
        update={
            "stack_dir": tmp_path_factory.mktemp("redis-cluster"),
            "redis_url": f"redis://127.0.0.1:{ports[0]}/0",
            "redis_cluster_nodes": ",".join(f"127.0.0.1:{p}" for p in ports),
        }
    )
    redis_cluster.start_cluster(settings)
    try:
        yield settings
    finally:
        redis_cluster.stop_cluster(settings)


@pytest.fixture(params=["standalone", "cluster"])
def any_feature_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """`feature_settings` on each topology: standalone Redis (its test database) and Redis Cluster (database 0)."""
    cluster = request.param == "cluster"
    base = request.getfixturevalue("cluster_stack" if cluster else "local_stack")
    with isolated_settings(
        base, tmp_path, redis_db=0 if cluster else TEST_REDIS_DB, prefix="adloop.test.events", consumer_batch_size=250
    ) as settings:
        yield settings
