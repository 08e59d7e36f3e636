"""A Redis still loading its data (`LOADING` replies) is treated like a down one: the breaker opens,
one log line, no traceback per request. Against a real redis-server made to load slowly."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from features.online import FeastLayout, OnlineFeatureReader
from serving.features_access import GuardedReader
from serving.redis_async import AsyncRedis
from tests.support.serving import free_port

pytestmark = pytest.mark.integration
KEYS = 5000
KEY_LOAD_DELAY_US = 1000  # per key: ~5 s of LOADING


def _server(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or pytest.fail("redis-server is not installed (apt-get install redis-server)")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
               "--appendonly", "no", *extra]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(condition, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _answers(port: int, *, loading_ok: bool) -> bool:
    """Whether a GET is answered (PING is answered even while loading); no retries (redis-py's default
    client retries LOADING replies for seconds)."""
    try:
        redis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_timeout=1).get("k0")
        return True
    except redis.BusyLoadingError:
        return loading_ok
    except redis.ConnectionError:
        return False


@pytest.fixture
def loading_redis(feature_settings, tmp_path: Path) -> Iterator[int]:
    """A Redis on a free port that answers LOADING for a few seconds (its RDB loads one key per ms);
    started after the other fixtures, so that it is still loading when the test starts."""
    port = free_port()
    filler = _server(tmp_path, port)
    client = redis.Redis(port=port)
    try:
        _wait(lambda: _answers(port, loading_ok=False))
        client.mset({f"k{i}": "v" for i in range(KEYS)})
        client.save()
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection
    filler.wait(timeout=10)
    slow = _server(tmp_path, port, "--key-load-delay", str(KEY_LOAD_DELAY_US),
                   "--loading-process-events-interval-bytes", "1024")  # fmt: skip
    try:
        yield port
    finally:
        slow.kill()
        slow.wait(timeout=10)


def test_a_loading_redis_opens_the_breaker_with_one_log_line(loading_redis: int, feature_settings, caplog) -> None:
    port = loading_redis
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: _answers(port, loading_ok=True))
    assert not _answers(port, loading_ok=False)  # it is loading now

    async def requests() -> list[str | None]:
        layout = FeastLayout.from_settings(feature_settings)
        reader = OnlineFeatureReader(redis.Redis(port=port), layout, AsyncRedis(url, timeout_s=0.5))
        guarded = GuardedReader(reader, retry_after_s=0.2)
        reasons = []
        for _ in range(40):  # ~2 s of requests while it loads
            reasons.append((await guarded.user_async("u1"))[1])
            await asyncio.sleep(0.05)
        return reasons

    with caplog.at_level(logging.WARNING, logger="serving.features_access"):
        reasons = asyncio.run(requests())
    assert set(reasons) == {"redis_down"}  # flagged like a down Redis, never "features_error"
    records = [r for r in caplog.records if r.name == "serving.features_access"]
    assert len(records) == 1 and "LOADING" in records[0].getMessage() and records[0].exc_info is None
    assert not _answers(port, loading_ok=False)  # still loading at the end: every request above met LOADING
