"""The long-lived parts of a serving process, built once (by `app.lifespan`) and reloadable without a restart.

`Runtime` owns the catalog + model (`ServingState`, swapped whole on reload: a request in flight
keeps the state it started with, so a reload drops nothing), the selector, the Redis client, the
impression logger and the background threads (ad-stats refresh, catalog file watch). No FastAPI.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import torch

from adloop.settings import Settings
from serving import metrics
from serving.catalog import Catalog, load_catalog
from serving.features_access import AdStats, GuardedReader, NoFeatures, request_path_redis, run_refresher
from serving.impressions import ImpressionLogger
from serving.pacing import Pacer
from serving.protocols import FeatureReader, ModelBundle, ModelRegistry
from serving.redis_async import AsyncRedis
from serving.selection import SelectionConfig, SelectionRequest, SelectionResult, Selector, ServingState, UserRead

log = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        feature_reader: FeatureReader | None = None,
        registry: ModelRegistry | None = None,
        producer_factory=None,
    ):
        self.settings = settings
        # Inference here is one user per request: torch's intra-op threads cannot help a batch of one,
        # and their spinning workers take CPU from the event loop and the Kafka sender.
        torch.set_num_threads(1)
        budget_s = settings.request_budget_ms / 1000
        self.redis = request_path_redis(settings.redis_url, timeout_s=budget_s)
        self.async_redis = AsyncRedis(settings.redis_url, timeout_s=budget_s)  # the routes' user reads
        self.reader = feature_reader or default_reader(self.redis, settings, self.async_redis)
        self.registry = registry or default_registry(settings)
        self.logger = ImpressionLogger(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topic=settings.events_topic,
            buffer_size=settings.impression_buffer,
            producer_factory=producer_factory,
        )
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._catalog_mtime = 0.0
        catalog = self._load_catalog()
        state = ServingState(catalog, self._load_model())
        self.pacer = Pacer(catalog, slack=settings.pacing_slack)
        self.ad_stats = AdStats(catalog)
        config = SelectionConfig(
            top_k=settings.serve_top_k,
            epsilon=settings.serve_epsilon,
            epsilon_no_model=settings.serve_epsilon_no_model,
            control_share=settings.control_share,
            control_salt=settings.control_salt,
        )
        guarded = GuardedReader(self.reader, retry_after_s=settings.redis_retry_after_s)
        self.selector = Selector(state, config, pacer=self.pacer, ad_stats=self.ad_stats, features=guarded)
        self._publish(state)

    @property
    def state(self) -> ServingState:
        return self.selector.state

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        # The background threads (impression drain, kafka-python's sender, pacing sync, ad-stats refresh) run
        # Python in bursts of milliseconds; a request waiting in the event loop gets the GIL back after at
        # most the switch interval: Python's 5 ms, 0.5 ms by default here (BENCHMARKS, Serving, session 5).
        sys.setswitchinterval(self.settings.gil_switch_interval_ms / 1000)
        self.logger.start()
        threads = [
            threading.Thread(
                target=run_refresher,
                name="ad-stats",
                daemon=True,
                args=(self.ad_stats, self.reader, lambda: self.state.catalog),
                kwargs={
                    "every_s": self.settings.ad_stats_refresh_s,
                    "full_every_s": self.settings.ad_stats_full_refresh_s,
                    "stop": self._stop,
                },
            )
        ]
        if self.settings.catalog_poll_s > 0:
            threads.append(threading.Thread(target=self._watch_catalog, name="catalog-watch", daemon=True))
        if self.settings.pacing_sync_s > 0:
            threads.append(threading.Thread(target=self._sync_pacing, name="pacing-sync", daemon=True))
        for thread in threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.logger.close(timeout=3.0)
        self.redis.close()
        self.async_redis.close()

    def reload(self) -> dict[str, Any]:
        """Re-read the catalog file and the promoted model; swap them in at once. Raises on a bad catalog
        (the old state keeps serving)."""
        with self._reload_lock:
            try:
                catalog = self._load_catalog()
                state = ServingState(catalog, self._load_model())
            except Exception:
                metrics.RELOADS.labels("failed").inc()
                raise
            self.pacer.rebase(catalog)
            self.ad_stats.reset(catalog)
            self.selector.state = state
            self._publish(state)
            metrics.RELOADS.labels("ok").inc()
            freeze_heap()  # the new catalog and model join the frozen heap (one pause per reload)
        threading.Thread(target=self._refresh_stats_once, daemon=True).start()
        return self.describe()

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {
            "catalog_version": state.catalog.version,
            "ads": len(state.catalog),
            "model_version": state.model_version,
            "model_loaded": state.model is not None,
        }

    # --- the request path -------------------------------------------------------------------

    async def select_async(self, request: SelectionRequest, *, route: str = "select", log_impressions: bool = True):
        """`select` for the async routes: the user's features are awaited (the event loop serves other
        requests while Redis answers), then selection runs in the loop (~1 ms of CPU, no thread-pool hop)."""
        user_read = await self.selector.read_user(request.user_id)
        return self.select(request, route=route, log_impressions=log_impressions, user_read=user_read)

    def select(
        self,
        request: SelectionRequest,
        *,
        route: str = "select",
        log_impressions: bool = True,
        user_read: UserRead | None = None,
    ):
        """(state, result): selection with metrics, pacing charge and impression logging; never raises."""
        state = self.state
        try:
            result = self.selector.select(request, state=state, user_read=user_read)  # rows index this state
        except Exception:
            log.exception("selection failed; answering with no ads")
            metrics.ERRORS.labels(route, "selection").inc()
            result = SelectionResult(
                request.request_id,
                request.user_id,
                "targeted",
                state.model_version,
                "internal_error",
                {s.slot_id: [] for s in request.slots},
                0,
                0,
                {},
            )
        for stage, seconds in result.timings.items():
            metrics.child(metrics.STAGE_SECONDS, stage).observe(seconds)
        metrics.child(metrics.ARMS, result.arm).inc()
        if result.fallback:
            metrics.child(metrics.FALLBACKS, result.fallback).inc()
        empty = sum(1 for picks in result.slots.values() if not picks)
        if empty:
            metrics.NO_FILL.labels(route).inc(empty)
        if log_impressions:
            try:
                self.selector.charge(state, result)
                self.logger.log(impression_records(result, request))
            except Exception:
                log.exception("impression logging failed")
                metrics.ERRORS.labels(route, "impressions").inc()
        return state, result

    def readiness(self) -> dict[str, Any]:
        try:
            redis_ok = bool(self.redis.ping())
        except Exception:
            redis_ok = False
        state = self.state
        checks = {
            "catalog": {"ok": len(state.catalog) > 0, "ads": len(state.catalog), "version": state.catalog.version},
            "redis": {"ok": redis_ok},
            "kafka": {"ok": self.logger.connected, "buffered": self.logger.buffered, "error": self.logger.last_error},
            "model": {"ok": True, "version": state.model_version, "loaded": state.model is not None},
        }
        return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}

    # --- helpers ----------------------------------------------------------------------------

    def _load_catalog(self) -> Catalog:
        path = Path(self.settings.catalog_path)
        self._catalog_mtime = path.stat().st_mtime
        return load_catalog(path)

    def _load_model(self) -> ModelBundle | None:
        try:
            version = self.registry.promoted()
            return self.registry.load(version) if version else None
        except Exception:
            log.exception("model load failed; serving with the fallback ranking")
            return None

    def _publish(self, state: ServingState) -> None:
        metrics.publish_model(state.model_version, state.model is not None)
        metrics.CATALOG_ADS.set(len(state.catalog))

    def _watch_catalog(self) -> None:
        while not self._stop.wait(self.settings.catalog_poll_s):
            try:
                if Path(self.settings.catalog_path).stat().st_mtime != self._catalog_mtime:
                    log.info("catalog file changed: reloading")
                    self.reload()
            except Exception:
                log.exception("catalog reload failed; the old catalog keeps serving")

    def _sync_pacing(self) -> None:
        """Share this process's spend with the other replicas (serving/pacing.py); its own Redis client, with
        a timeout for a background job, not the request path's budget."""
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        failing = False
        while not self._stop.wait(self.settings.pacing_sync_s):
            try:
                self.pacer.sync(client)
                failing = False
            except Exception as error:
                if not failing:  # once per outage, not once per second
                    log.warning("pacing sync failed (%s): this process paces alone until Redis answers", error)
                failing = True
        client.close()

    def _refresh_stats_once(self) -> None:
        try:
            self.ad_stats.refresh(self.reader, self.state.catalog)
        except Exception as error:
            log.warning("ad stats refresh after reload failed: %s", error)


def freeze_heap() -> None:
    """Take everything alive now out of the cyclic GC's reach (`gc.freeze`): the catalog, the model and
    the imported libraries are ~350k objects, and a full collection over them stalls every request for
    ~160 ms (`python -m bench.gc_pause`), a p99 spike several times a minute under load. Requests'
    own garbage is still collected; what a frozen object holds is still freed by reference counting."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def impression_records(result: SelectionResult, request: SelectionRequest) -> list[dict[str, Any]]:
    """One record per served ad (fields of the `ad_impression` event)."""
    slots = {s.slot_id: s for s in request.slots}
    records = []
    for slot_id, picks in result.slots.items():
        slot = slots[slot_id]
        context = {**request.context, "format": slot.format}
        if slot.position is not None:
            context["slot_position"] = slot.position
        if result.fallback:
            context["fallback"] = result.fallback
        for c in picks:
            records.append(
                {
                    "event_id": uuid.uuid4().hex,
                    "user_id": result.user_id,
                    "ad_id": c.ad_id,
                    "campaign_id": c.campaign_id,
                    "category": c.category,
                    "request_id": result.request_id,
                    "slot_id": slot_id,
                    "position": c.rank,
                    "model_version": result.model_version,
                    "arm": result.arm,
                    "propensity": c.propensity,
                    "context": {**context, "advertiser_id": c.advertiser_id},
                    "ts": int(time.time() * 1000),
                }
            )
    return records


def default_reader(client: redis.Redis, settings: Settings, async_client: AsyncRedis | None = None) -> FeatureReader:
    """Feast's Redis layout read directly (features/online.py); the layout comes from the Feast registry."""
    from features.online import FeastLayout, OnlineFeatureReader

    try:
        return OnlineFeatureReader(client, FeastLayout.from_settings(settings), async_client)
    except Exception as error:  # no registry yet (`adloop stack up` applies it): serve with defaults
        log.warning("Feast registry unavailable (%s): user features default to empty; run `adloop stack up`", error)
        return NoFeatures()


def default_registry(settings: Settings) -> ModelRegistry:
    from models.registry import Registry

    return Registry(settings.model_registry_path)
