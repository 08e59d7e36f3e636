"""Serving's Redis clients, opened on first use, so a serving process starts while Redis Cluster is down.

redis-py's `RedisCluster` reads the cluster's slot map while it is constructed, and raises
`RedisClusterException` (not a `RedisError`) when no seed node answers; the standalone client connects
on its first command. A serving process must start and answer (flagged, without features) while
Redis is down, so on a cluster `open_redis` hands back a `LazyRedis`: it builds the client at the first
command, and until it can, every command raises `redis.ConnectionError` (what the callers already
handle as "Redis down"). Standalone: the factory's client itself, unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from adloop.settings import Settings
from features.redis_client import AnyRedis, is_cluster, redis_client

# What a cluster client raises when the cluster cannot be reached: connection errors, CLUSTERDOWN, and
# redis-py's cluster-level exception (no node answers, a slot no node serves), which is not a RedisError.
REDIS_DOWN = (redis.ConnectionError, redis.exceptions.ClusterDownError, RedisClusterException, OSError)


class LazyRedis:
    """A `features.redis_client.redis_client(settings, **options)` built at its first command."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self._settings, self._options = settings, options
        self._client: AnyRedis | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # only for what LazyRedis itself lacks: the client's methods
        return getattr(self._client or self._open(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _open(self) -> AnyRedis:
        with self._lock:  # one construction (a slot-map read) for the threads that arrive meanwhile
            if self._client is None:
                try:
                    self._client = redis_client(self._settings, **self._options)
                except RedisClusterException as error:
                    raise redis.ConnectionError(f"Redis Cluster unreachable: {error}") from error
            return self._client


def open_redis(settings: Settings, **options: Any) -> AnyRedis | LazyRedis:
    """`redis_client(settings, **options)`, opened at its first command on a cluster (see the module doc)."""
    return LazyRedis(settings, **options) if is_cluster(settings) else redis_client(settings, **options)
