"""The request path's pipelined asyncio Redis connection, against the real Redis of the local stack."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis

from adloop.settings import Settings
from serving.redis_async import AsyncRedis
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
