"""CPU per request-path read on Redis Cluster against standalone Redis: the user HMGET and a chunk of ad rows.

    ADLOOP_REDIS_CLUSTER_NODES=127.0.0.1:7000,... .venv/bin/python -m bench.cluster_reads [--reads 10000]

With the cluster of the settings (`adloop stack up --redis-cluster`) and the standalone Redis of
`--standalone-url` (default the local stack's, database 15): the user HMGET (11 fields, `--in-flight`
concurrent) through `serving.redis_async.AsyncRedis` (standalone), `AsyncRedisCluster` and redis.asyncio's
`RedisCluster`; then 50 HMGETs in one pipeline (`OnlineFeatureReader.ads`' chunk) through redis-py's
`Redis` and `RedisCluster` pipelines. Prints wall and CPU microseconds per read, three rounds each (a
shared machine is noisy: compare within one run). Writes and deletes its own `bench:cluster:*` keys.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import redis
from redis.asyncio.cluster import ClusterNode as AsyncNode
from redis.asyncio.cluster import RedisCluster as AsyncCluster

from adloop.settings import get_settings
from features.redis_client import cluster_nodes, is_cluster, redis_client
from serving.redis_async import AsyncRedis, AsyncRedisCluster

FIELDS = [f"f{i}".encode() for i in range(11)]
KEYS = [f"bench:cluster:{i}".encode() for i in range(100)]


async def _timed(read: Callable[[bytes], Awaitable], reads: int, in_flight: int) -> tuple[float, float]:
    async def worker(start: int) -> None:
        for i in range(start, reads, in_flight):
            await read(KEYS[i % len(KEYS)])

    await read(KEYS[0])  # connected (and the map read)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    return (time.perf_counter() - wall) / reads * 1e6, (time.process_time() - cpu) / reads * 1e6


def _pipelines(client, rounds: int = 200) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        pipe = client.pipeline(transaction=False)
        for key in KEYS[:50]:
            pipe.hmget(key, FIELDS)
        pipe.execute()
    return (time.perf_counter() - wall) / rounds * 1e3, (time.process_time() - cpu) / rounds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--standalone-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    settings = get_settings()
    if not is_cluster(settings):
        raise SystemExit("set ADLOOP_REDIS_CLUSTER_NODES (adloop stack up --redis-cluster starts one)")
    cluster, standalone = redis_client(settings), redis.Redis.from_url(args.standalone_url)
    for client in (cluster, standalone):
        for key in KEYS:
            client.hset(key, mapping={f: b"x" * 8 for f in FIELDS})
    nodes = cluster_nodes(settings)

    async def ours_standalone() -> tuple[float, float]:
        client = AsyncRedis(args.standalone_url, timeout_s=5.0)
        return await _timed(lambda k: client.execute("HMGET", k, *FIELDS), args.reads, args.in_flight)

    async def ours_cluster() -> tuple[float, float]:
        client = AsyncRedisCluster(settings.redis_url, nodes, timeout_s=5.0)
        return await _timed(lambda k: client.execute("HMGET", k, *FIELDS), args.reads, args.in_flight)

    async def redis_asyncio_cluster() -> tuple[float, float]:
        client = AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in nodes])
        try:
            return await _timed(lambda k: client.hmget(k, FIELDS), args.reads, args.in_flight)
        finally:
            await client.aclose()

    try:
        for _ in range(3):
            for name, run in (("AsyncRedis, standalone", ours_standalone), ("AsyncRedisCluster", ours_cluster),
                              ("redis.asyncio RedisCluster", redis_asyncio_cluster)):  # fmt: skip
                print(f"user HMGET  {name:28s} us wall / cpu per read: %.1f / %.1f" % asyncio.run(run()))
        for _ in range(3):
            for name, client in (("Redis pipeline", standalone), ("RedisCluster pipeline", cluster)):
                print(f"50 ad HMGETs {name:27s} ms wall / cpu per pipeline: %.2f / %.2f" % _pipelines(client))
    finally:
        for client in (cluster, standalone):
            for key in KEYS:
                client.delete(key)


if __name__ == "__main__":
    main()
