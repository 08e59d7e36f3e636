"""Tombstones through the Redis factory: written and read back on the configured Redis Cluster."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from adloop.settings import Settings
from features import tombstones
from features.redis_client import redis_client


def _cluster_settings(tmp_path: Path) -> Settings:
    settings = Settings(stack_dir=tmp_path)
    if not settings.redis_cluster_nodes:
        pytest.skip("ADLOOP_REDIS_CLUSTER_NODES not set (adloop stack up --redis-cluster)")
    try:
        redis_client(settings, timeout_s=1.0).ping()
    except (redis.RedisError, OSError):
        pytest.skip("the configured Redis Cluster is not up")
    return settings


def test_a_tombstone_written_on_the_cluster_is_read_back_without_a_client_given(tmp_path: Path) -> None:
    settings = _cluster_settings(tmp_path)
    client = redis_client(settings)
    assert isinstance(client, RedisCluster)
    user = f"erase-{uuid.uuid4().hex}"
    try:
        at = tombstones.write(settings, client, user, at_ms=1234)
        (tmp_path / tombstones.FILE_NAME).unlink()  # only Redis is left to say it
        assert tombstones.erased(settings)[user] == at
    finally:
        client.hdel(tombstones.REDIS_KEY, user)
