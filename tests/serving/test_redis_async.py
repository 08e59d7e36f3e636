"""The request path's pipelined asyncio Redis connection, against the real Redis of the local stack and a real
Redis Cluster (slot routing, MOVED, ASK, a node that cannot be reached)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from adloop.settings import Settings
from features.redis_client import cluster_nodes, is_cluster, redis_client
from serving.redis_async import AsyncRedis, AsyncRedisCluster, async_redis_client
from tests.support.serving import free_port

pytestmark = pytest.mark.integration

# Holds Redis ~150 ms before answering (a slow reply, with no DEBUG command needed).
SLOW_SCRIPT = "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] " \
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 150000 return 'late'"  # fmt: skip


@pytest.fixture
def keys(feature_settings: Settings):
    client = redis.Redis.from_url(feature_settings.redis_url)
    prefix = f"async-test:{uuid.uuid4().hex[:8]}:"
    yield client, prefix
    client.delete(*client.keys(prefix + "*") or [prefix])


def test_concurrent_commands_get_their_own_replies_in_the_selected_db(feature_settings: Settings, keys) -> None:
    sync, prefix = keys
    sync.mset({f"{prefix}{i}": f"v{i}" for i in range(300)})
    client = AsyncRedis(feature_settings.redis_url, timeout_s=5.0)

    async def main() -> list:
        return await asyncio.gather(*(client.execute("GET", f"{prefix}{i}") for i in range(300)))

    assert asyncio.run(main()) == [f"v{i}".encode() for i in range(300)]
    assert asyncio.run(main())[7] == b"v7"  # a second loop (as tests' clients use): it reconnects


def test_a_late_reply_is_dropped_and_the_connection_stays_in_step(feature_settings: Settings, keys) -> None:
    sync, prefix = keys
    sync.set(prefix + "k", "value")
    client = AsyncRedis(feature_settings.redis_url, timeout_s=0.05)

    async def main() -> tuple:
        await client.execute("PING")  # connected
        slow = asyncio.ensure_future(client.execute("EVAL", SLOW_SCRIPT, 0))
        await asyncio.sleep(0)  # the script is written, with its 50 ms deadline
        client.timeout_s = 5.0
        after = await client.execute("GET", prefix + "k")  # queued behind the script on the same connection
        return await asyncio.gather(slow, return_exceptions=True), after

    (slow,), after = asyncio.run(main())
    assert isinstance(slow, redis.TimeoutError)
    assert after == b"value"  # not the script's late "late"


def test_errors_are_redis_py_types_and_a_dropped_connection_is_replaced(feature_settings: Settings, keys) -> None:
    sync, prefix = keys
    sync.set(prefix + "k", "value")
    with pytest.raises(redis.ConnectionError, match="cannot reach Redis"):
        asyncio.run(AsyncRedis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5).execute("PING"))
    client = AsyncRedis(feature_settings.redis_url, timeout_s=5.0)

    async def main() -> tuple:
        with pytest.raises(redis.ResponseError):
            await client.execute("NOSUCHCOMMAND")
        name = f"adloop-test-{uuid.uuid4().hex[:6]}"
        await client.execute("CLIENT", "SETNAME", name)
        killed = [c for c in sync.client_list() if c.get("name") == name]
        sync.execute_command("CLIENT", "KILL", "ID", killed[0]["id"])
        for _ in range(50):  # the loop notices the close
            if client._replies is None or client._replies.lost is not None:
                break
            await asyncio.sleep(0.01)
        return await client.execute("GET", prefix + "k")

    assert asyncio.run(main()) == b"value"


def test_either_topology_answers_each_key_from_its_node(any_feature_settings: Settings) -> None:
    """async_redis_client follows the settings: on a cluster each key's command reaches the master of its slot
    (keys of 300 slots over 3 nodes; a key on the wrong node would answer MOVED)."""
    sync = redis_client(any_feature_settings)
    prefix = f"async-test:{uuid.uuid4().hex[:8]}:"
    for i in range(300):
        sync.set(f"{prefix}{i}", f"v{i}", ex=60)
    client = async_redis_client(any_feature_settings, timeout_s=5.0)
    assert isinstance(client, AsyncRedisCluster) == is_cluster(any_feature_settings)

    async def main() -> list:
        return await asyncio.gather(*(client.execute("GET", f"{prefix}{i}") for i in range(300)))

    assert asyncio.run(main()) == [f"v{i}".encode() for i in range(300)]
    assert asyncio.run(main())[7] == b"v7"  # a second loop: every node's connection is made again
    client.close()


def _cluster(settings: Settings) -> tuple[RedisCluster, AsyncRedisCluster]:
    return redis_client(settings), AsyncRedisCluster(settings.redis_url, cluster_nodes(settings), timeout_s=5.0)


def test_a_moved_slot_is_followed_and_remapped(cluster_stack: Settings) -> None:
    sync, client = _cluster(cluster_stack)
    key = f"async-test:{uuid.uuid4().hex[:8]}"
    sync.set(key, "value", ex=60)
    slot = key_slot(key.encode())
    owner = sync.nodes_manager.get_node_from_slot(slot)

    async def main() -> tuple:
        await client.execute("PING")  # the map is read
        wrong = next(n for n in client._nodes.values() if (n.host, n.port) != (owner.host, owner.port))
        client._slots[slot] = wrong  # as after a resharding moved the slot away from the node we knew
        value = await client.execute("GET", key)  # MOVED: followed at once
        remapped = client._slots[slot]
        await client._refreshing  # the whole map read again in the background
        return value, (remapped.host, remapped.port)

    assert asyncio.run(main()) == (b"value", (owner.host, owner.port))
    client.close()


def test_a_slot_in_migration_is_asked_of_its_new_node(cluster_stack: Settings) -> None:
    """ASK: a key that already left a migrating slot is read from the importing node after ASKING."""
    sync, client = _cluster(cluster_stack)
    key = f"async-test:{uuid.uuid4().hex[:8]}"
    slot = key_slot(key.encode())
    source = sync.nodes_manager.get_node_from_slot(slot)
    target = next(n for n in sync.get_primaries() if n.name != source.name)
    ids = {n.name: sync.execute_command("CLUSTER MYID", target_nodes=n).decode() for n in (source, target)}
    direct = redis.Redis(host=target.host, port=target.port, single_connection_client=True)  # ASKING: one connection
    try:  # the slot half-migrated, this key on the importing node only (not on the migrating one: ASK)
        sync.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.name], target_nodes=target)
        sync.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.name], target_nodes=source)
        direct.execute_command("ASKING")
        direct.set(key, "moved-already", ex=60)

        async def main() -> bytes:
            return await client.execute("GET", key)

        assert asyncio.run(main()) == b"moved-already"
        assert client._slots[slot].port == source.port  # ASK changes nothing in the map
    finally:
        direct.execute_command("ASKING")  # while the target still imports the slot
        direct.delete(key)
        for node in (source, target):
            sync.execute_command("CLUSTER SETSLOT", slot, "STABLE", target_nodes=node)
        client.close()


def test_a_node_that_cannot_be_reached_is_an_error_then_the_map_is_read_again(cluster_stack: Settings) -> None:
    sync, client = _cluster(cluster_stack)
    key = f"async-test:{uuid.uuid4().hex[:8]}"
    sync.set(key, "value", ex=60)
    slot = key_slot(key.encode())

    async def main() -> bytes:
        await client.execute("PING")
        client._slots[slot] = client._node("127.0.0.1", free_port())  # a master that died (a replica took over)
        with pytest.raises(redis.ConnectionError, match="cannot reach Redis"):
            await client.execute("GET", key)
        return await client.execute("GET", key)  # the map read again first: the slot's live master answers

    assert asyncio.run(main()) == b"value"
    client.close()
