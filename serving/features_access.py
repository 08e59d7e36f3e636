"""Reading online features in the request path: a time-bounded user read, and an in-memory ad-stats cache.

`await GuardedReader.user()` never raises: it returns `(features, fallback_reason)`. The time budget is
the Redis client's socket timeout (`request_path_redis`); after a connection failure Redis is
skipped for `retry_after_s` so that a dead Redis costs one failed connect per second, not one per
request. Ad performance (CTR) changes slowly, so it is refreshed in the background into numpy
columns aligned with the catalog instead of being read per request (STACK.md: never per candidate).

The reader itself is `features.online.OnlineFeatureReader` (Feast's own Redis layout).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from serving.catalog import Catalog
from serving.scoring import AD_STAT_COLUMNS, FeatureReader

log = logging.getLogger(__name__)
CTR_PRIOR = 0.05  # streaming.aggregates' Beta prior mean: an ad without data


def request_path_redis(url: str, *, timeout_s: float, max_connections: int = 64) -> redis.Redis:
    """A Redis client for the request path: the socket timeout is the time budget, and no retries
    (redis-py 7 retries 3 times with up to seconds of back-off by default: wrong for a 20 ms budget)."""
    return redis.Redis.from_url(url, **_budget(timeout_s), retry=Retry(NoBackoff(), 0), max_connections=max_connections)


def request_path_redis_async(url: str, *, timeout_s: float, max_connections: int = 64) -> redis.asyncio.Redis:
    """The same, for the event loop (create it inside the loop that will use it)."""
    retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    return redis.asyncio.Redis.from_url(url, **_budget(timeout_s), retry=retry, max_connections=max_connections)


def _budget(timeout_s: float) -> dict[str, float]:
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


class NoFeatures:
    """The reader while no Feast registry exists: every user and ad is unknown (serving answers with defaults)."""

    def user(self, user_id: str) -> dict[str, Any]:
        return {}

    def ads(self, ad_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {}


class GuardedReader:
    """A `FeatureReader` behind a time budget and a circuit breaker; reports why it fell back."""

    def __init__(self, reader: FeatureReader, *, budget_s: float, retry_after_s: float = 1.0):
        self.reader = reader
        self.budget_s = budget_s
        self.retry_after_s = retry_after_s
        self._down_until = 0.0

    async def user(self, user_id: str) -> tuple[dict[str, Any], str | None]:
        """Awaits the reader's `user_async` within the budget where it has one (Redis), else calls `user`
        (in-memory readers)."""
        if time.monotonic() < self._down_until:
            return {}, "redis_down"
        read = getattr(self.reader, "user_async", None)
        try:
            if read is None:
                features = self.reader.user(user_id)
            else:
                async with asyncio.timeout(self.budget_s):  # the whole read: pool, connect, reply
                    features = await read(user_id)
        except (redis.TimeoutError, TimeoutError):  # before OSError: TimeoutError is one
            return {}, "redis_slow"
        except (redis.ConnectionError, OSError):
            self._down_until = time.monotonic() + self.retry_after_s
            return {}, "redis_down"
        except Exception:  # a broken row must not break the request
            log.exception("user feature read failed")
            return {}, "features_error"
        # A row that arrived within the budget is not flagged, even when the event loop was busy before it
        # resumed this request: that is queueing (the stage histogram shows it), not a degraded answer.
        return features, None


class AdStats:
    """Ad performance columns aligned with a catalog, swapped atomically on refresh."""

    def __init__(self, catalog: Catalog):
        self.columns = _prior_columns(catalog)
        self.catalog_version = catalog.version
        self.refreshed_at: float | None = None

    def refresh(self, reader: FeatureReader, catalog: Catalog, *, chunk: int = 1000) -> None:
        columns = _prior_columns(catalog)
        ids = [str(a) for a in catalog.ad_ids]
        for start in range(0, len(ids), chunk):
            rows = reader.ads(ids[start : start + chunk])
            for ad_id, row in rows.items():
                i = catalog.index.get(ad_id)
                if i is None:
                    continue
                for name in AD_STAT_COLUMNS:
                    if row.get(name) is not None:
                        columns[name][i] = float(row[name])
        self.columns, self.catalog_version, self.refreshed_at = columns, catalog.version, time.time()

    def reset(self, catalog: Catalog) -> None:
        if catalog.version != self.catalog_version:
            self.columns, self.catalog_version = _prior_columns(catalog), catalog.version


def run_refresher(stats: AdStats, reader: FeatureReader, get_catalog, *, every_s: float, stop: threading.Event):
    """Background loop (a daemon thread): refresh ad stats every `every_s`; errors are logged, not fatal."""
    while not stop.is_set():
        catalog = get_catalog()
        try:
            stats.refresh(reader, catalog)
        except Exception as error:  # Redis down: keep the last values
            stats.reset(catalog)
            log.warning("ad stats refresh failed: %s", error)
        stop.wait(every_s)


def _prior_columns(catalog: Catalog) -> dict[str, np.ndarray]:
    n = len(catalog)
    return {name: np.full(n, CTR_PRIOR if name.startswith("ad_ctr") else 0.0) for name in AD_STAT_COLUMNS}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
