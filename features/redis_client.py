"""The one way to open Redis: standalone or Redis Cluster, with the settings' password and TLS.

Topology: `ADLOOP_REDIS_CLUSTER_NODES` (host:port,...) set means Redis Cluster, else the standalone
server of `ADLOOP_REDIS_URL`. Credentials and TLS come from `ADLOOP_REDIS_URL` in both cases
(`redis://user:password@...`; `rediss://` for TLS, with redis-py's `?ssl_ca_certs=<CA file>` and
`?ssl_cert_reqs=none`): a cluster takes its scheme and password, its nodes from the list, and has
only database 0. Feast's connection string is built here too, so the consumer, serving and Feast
always reach the same Redis the same way.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from adloop.settings import Settings

AnyRedis = redis.Redis | RedisCluster


def is_cluster(settings: Settings) -> bool:
    return bool(settings.redis_cluster_nodes)


def cluster_nodes(settings: Settings) -> list[tuple[str, int]]:
    """(host, port) of each configured cluster seed node, in order."""
    out = []
    for node in (settings.redis_cluster_nodes or "").split(","):
        if node.strip():
            host, _, port = node.strip().rpartition(":")
            out.append((host or "127.0.0.1", int(port)))
    return out


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Username, password, TLS and (standalone only) host, port and db, from `redis_url`."""
    url = urlparse(settings.redis_url)
    if url.scheme not in ("redis", "rediss"):
        raise ValueError(f"ADLOOP_REDIS_URL must be redis:// or rediss://, not {settings.redis_url!r}")
    kwargs: dict[str, Any] = {}
    if url.username:
        kwargs["username"] = unquote(url.username)
    if url.password:
        kwargs["password"] = unquote(url.password)
    if url.scheme == "rediss":
        kwargs["ssl"] = True
        options = {k: v[-1] for k, v in parse_qs(url.query).items()}  # redis-py's URL options for TLS
        if "ssl_ca_certs" in options:
            kwargs["ssl_ca_certs"] = options["ssl_ca_certs"]
        if "ssl_cert_reqs" in options:
            kwargs["ssl_cert_reqs"] = options["ssl_cert_reqs"].lower()
    if not is_cluster(settings):
        kwargs.update(host=url.hostname or "127.0.0.1", port=url.port or 6379, db=int((url.path or "/0")[1:] or 0))
    return kwargs


def redis_client(
    settings: Settings, *, timeout_s: float | None = 5.0, retries: bool = True, max_connections: int | None = None
) -> AnyRedis:
    """A client for the configured topology. `retries=False` for callers that must see every failure
    (a transaction whose reply was lost must not be sent again; a request path with a 20 ms budget)."""
    kwargs: dict[str, Any] = {
        **connection_kwargs(settings),
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    if not retries:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if is_cluster(settings):
        nodes = [ClusterNode(host, port) for host, port in cluster_nodes(settings)]
        return RedisCluster(startup_nodes=nodes, **kwargs)
    return redis.Redis(**kwargs)


def feast_online_store(settings: Settings) -> tuple[str, str]:
    """Feast's `redis_type` and `connection_string` for the configured Redis."""
    kwargs = connection_kwargs(settings)
    params = [f"{name}={kwargs[name]}" for name in ("username", "password") if name in kwargs]
    if kwargs.get("ssl"):
        params.append("ssl=true")
    if is_cluster(settings):
        nodes = [f"{host}:{port}" for host, port in cluster_nodes(settings)]
        return "redis_cluster", ",".join(nodes + params)
    return "redis", ",".join([f"{kwargs['host']}:{kwargs['port']}", f"db={kwargs['db']}", *params])
