"""Reading online features in the request path: a time-bounded user read, and an in-memory ad-stats cache.

`GuardedReader.user()` never raises: it returns `(features, fallback_reason)`. The API's routes await
`user_async()`: one HMGET on a pipelined asyncio connection (serving.redis_async: hiredis, no
redis.asyncio, whose CPU per read was more than the read's), so the event loop serves other requests
while Redis answers. The time budget is the Redis client's socket timeout; a timeout or a
connection failure opens a circuit breaker, so a slow or dead Redis costs at most a budget or two per
`slow_skip_s` / `retry_after_s`, not one per request. Ad performance (CTR) changes slowly,
so it is refreshed in the background into numpy columns aligned with the catalog instead of being read
per request (STACK.md: never per candidate).

The reader itself is `features.online.OnlineFeatureReader` (Feast's own Redis layout).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from adloop.settings import Settings
from features.aggregates import CTR_PRIOR
from features.redis_client import AnyRedis
from serving.catalog import Catalog
from serving.protocols import AD_STAT_COLUMNS, FeatureReader
from serving.redis_lazy import REDIS_DOWN, LazyRedis, open_redis

log = logging.getLogger(__name__)

REFRESH_CHUNK = 50  # ads per round trip of an ad-stats refresh (~1 ms of Python under the GIL)
REFRESH_GIL_SHARE = 0.2  # the most of the GIL an ad-stats refresh holds while it runs


def request_path_redis(settings: Settings, *, timeout_s: float, max_connections: int = 64) -> AnyRedis | LazyRedis:
    """A Redis client for the request path, standalone or cluster by the settings: the socket timeout is the
    time budget, and no retries (redis-py 7 retries 3 times with up to seconds of back-off by default: wrong
    for a 20 ms budget). On a cluster `max_connections` is per node, and the client is opened at its first
    command (serving.redis_lazy: a process starts while the cluster is down)."""
    return open_redis(settings, timeout_s=timeout_s, retries=False, max_connections=max_connections)


class NoFeatures:
    """The reader while no Feast registry exists: every user and ad is unknown (serving answers with defaults,
    flagged `no_feature_store` by `GuardedReader`, and the runtime keeps trying to build the real reader)."""

    def __init__(self, reason: str = "no feature store"):
        self.reason = reason

    def user(self, user_id: str) -> dict[str, Any]:
        return {}

    def ads(self, ad_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {}


class GuardedReader:
    """A `FeatureReader` behind a circuit breaker; reports why it fell back.

    After a connection failure, or a Redis still loading its data (`LOADING`), Redis is skipped for
    `retry_after_s` ("redis_down"), with one log line per outage (not one per request). A timeout (the
    client's socket timeout is the budget) answers that request without features ("redis_slow"); a
    second one in a row also skips Redis for `slow_skip_s`: a stray slow reply (a CPU-starved Redis on
    a busy host) costs one request, a persistently slow Redis stalls the loop at most two budgets per
    `slow_skip_s`.
    """

    def __init__(self, reader: FeatureReader, *, retry_after_s: float = 1.0, slow_skip_s: float = 0.2):
        self.reader = reader
        self.retry_after_s = retry_after_s
        self.slow_skip_s = slow_skip_s
        self._skip_until, self._skip_reason = 0.0, "redis_down"
        self._timeouts = 0  # in a row
        self._down_since: float | None = None  # first failure of the current outage (logged once)

    def user(self, user_id: str) -> tuple[dict[str, Any], str | None]:
        if isinstance(self.reader, NoFeatures):
            return {}, "no_feature_store"
        if time.monotonic() < self._skip_until:
            return {}, self._skip_reason
        try:
            features = self.reader.user(user_id)
        except Exception as error:
            return {}, self._failed(error)
        self._recovered()
        return features, None

    async def user_async(self, user_id: str) -> tuple[dict[str, Any], str | None]:
        """`user` awaiting Redis in the event loop when the reader can (`user_async`), so the loop serves
        other requests meanwhile."""
        read = getattr(self.reader, "user_async", None)
        if read is None or isinstance(self.reader, NoFeatures):
            return self.user(user_id)
        if time.monotonic() < self._skip_until:
            return {}, self._skip_reason
        try:
            features = await read(user_id)
        except Exception as error:
            return {}, self._failed(error)
        self._recovered()
        return features, None

    def _failed(self, error: Exception) -> str:
        """The fallback reason of a failed read, opening the breaker where the failure says so."""
        if isinstance(error, redis.TimeoutError):
            self._timeouts += 1
            return self._skip("redis_slow", self.slow_skip_s) if self._timeouts >= 2 else "redis_slow"
        if isinstance(error, REDIS_DOWN):  # BusyLoadingError (LOADING) and a cluster's CLUSTERDOWN included
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("Redis unavailable for user features (%s): serving without them, retrying every %g s",
                            error, self.retry_after_s)  # fmt: skip
            return self._skip("redis_down", self.retry_after_s)
        log.error("user feature read failed", exc_info=error)  # a broken row must not break the request
        return "features_error"

    def _recovered(self) -> None:
        self._timeouts = 0
        if self._down_since is not None:
            log.warning("Redis answers again for user features after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    def _skip(self, reason: str, seconds: float) -> str:
        self._skip_until, self._skip_reason = time.monotonic() + seconds, reason
        return reason


class AdStats:
    """Ad performance columns aligned with a catalog, swapped whole on refresh (a request reads one dict)."""

    def __init__(self, catalog: Catalog):
        self.columns = _prior_columns(catalog)
        self.catalog_version = catalog.version
        self.read_since_ms: int | None = None  # rows written after this are read by the next `refresh_changed`
        self._stamps: dict[str, int] = {}  # ad -> write stamp of its row as last re-read (within the overlap)

    def refresh(
        self,
        reader: FeatureReader,
        catalog: Catalog,
        *,
        chunk: int = REFRESH_CHUNK,
        gil_share: float = REFRESH_GIL_SHARE,
    ) -> None:
        """Read every ad's row, `chunk` ads per round trip. It runs in a thread beside the event loop and holds
        the GIL while it decodes (`python -m bench.select_path` times it), so after each chunk it sleeps long
        enough to hold the GIL at most `gil_share` of the time: a request waits at most a chunk, and the loop
        keeps most of its speed while a refresh runs. Short pauses after long chunks starve the loop: its
        requests queue behind the refresh and the p99 of the whole process follows."""
        started_ms = int(time.time() * 1000)
        columns = _prior_columns(catalog)
        _read_into(columns, reader, catalog, [str(a) for a in catalog.ad_ids], chunk, gil_share)
        self.columns, self.catalog_version, self.read_since_ms = columns, catalog.version, started_ms

    def refresh_changed(self, reader: FeatureReader, catalog: Catalog, *, overlap_s: float = 5.0) -> bool:
        """Re-read only the ads whose rows were written since the last refresh began (minus `overlap_s`, for
        transactions in flight and writers' clocks), from the changed-ads index that `write_rows` keeps; an
        ad of the overlap already re-read at the same write stamp is not read again (each ad of a steady
        stream was read once per refresh while in the overlap). False when that cannot be done (a reader
        without the index, no full refresh yet, another catalog): the caller refreshes fully."""
        changed = getattr(reader, "changed_ads", None)
        if changed is None or self.read_since_ms is None or catalog.version != self.catalog_version:
            return False
        started_ms = int(time.time() * 1000)
        stamps = changed(self.read_since_ms - int(overlap_s * 1000))
        ids = [a for a, ms in stamps.items() if self._stamps.get(a) != ms and a in catalog.index]
        if ids:  # a new dict only when something changed: requests hold the old one meanwhile
            columns = {name: values.copy() for name, values in self.columns.items()}
            _read_into(columns, reader, catalog, ids, REFRESH_CHUNK, REFRESH_GIL_SHARE)
            self.columns = columns
        self.read_since_ms, self._stamps = started_ms, stamps
        return True

    def reset(self, catalog: Catalog) -> None:
        if catalog.version != self.catalog_version:
            self.columns, self.catalog_version, self.read_since_ms = _prior_columns(catalog), catalog.version, None
            self._stamps = {}


def run_refresher(
    stats: AdStats, reader: FeatureReader, get_catalog, *, every_s: float, full_every_s: float, stop: threading.Event
):
    """Background loop (a daemon thread): every `every_s` re-read the ads changed since the last look, and
    every `full_every_s` (or when the reader cannot tell what changed) all of them; errors are logged, not
    fatal (Redis down: the last values stay)."""
    last_full = time.monotonic() if stats.read_since_ms is not None else -float("inf")  # read at start or not
    while not stop.is_set():
        catalog = get_catalog()
        try:
            if time.monotonic() - last_full >= full_every_s or not stats.refresh_changed(reader, catalog):
                stats.refresh(reader, catalog)
                last_full = time.monotonic()
        except Exception as error:
            stats.reset(catalog)
            log.warning("ad stats refresh failed: %s", error)
        stop.wait(every_s)


def _read_into(
    columns: dict[str, np.ndarray], reader: FeatureReader, catalog: Catalog, ids: list[str], chunk: int,
    gil_share: float,
) -> None:  # fmt: skip
    """Read `ids`' rows into `columns` (catalog-aligned), `chunk` per round trip, yielding the GIL after each."""
    for start in range(0, len(ids), chunk):
        cpu = time.thread_time()
        rows = reader.ads(ids[start : start + chunk])
        for ad_id, row in rows.items():
            i = catalog.index.get(ad_id)
            if i is None:
                continue
            for name in AD_STAT_COLUMNS:
                if row.get(name) is not None:
                    columns[name][i] = float(row[name])
        time.sleep((time.thread_time() - cpu) * (1 / gil_share - 1))


def _prior_columns(catalog: Catalog) -> dict[str, np.ndarray]:
    n = len(catalog)
    return {name: np.full(n, CTR_PRIOR if name.startswith("ad_ctr") else 0.0) for name in AD_STAT_COLUMNS}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
