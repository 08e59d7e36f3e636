"""The lifecycle of a serving process: build its long-lived parts once (`app.lifespan`), start their
background threads, reload the catalog and model without a restart, stop.

`Runtime` owns the catalog + model (`ServingState`, swapped whole on reload: a request in flight
keeps the state it started with, so a reload drops nothing), the selector, the Redis clients, the
impression logger and the background threads (ad-stats refresh, catalog file watch, pacing sync).
The request path itself is `serving.pipeline.RequestPipeline` (`runtime.pipeline`). No FastAPI.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import redis
import torch

from adloop.settings import Settings
from serving import metrics
from serving.catalog import Catalog, load_catalog
from serving.features_access import AdStats, GuardedReader, NoFeatures, request_path_redis, run_refresher
from serving.impressions import ImpressionLogger, kafka_producer
from serving.pacing import Pacer
from serving.pipeline import RequestPipeline
from serving.protocols import FeatureReader, ModelBundle, ModelRegistry
from serving.redis_async import AsyncRedis
from serving.selection import SelectionConfig, Selector, ServingState
from serving.signing import secret_of
from serving.tracking import Touch, TouchStore, encode_token

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
            topic=settings.events_topic,
            dlq_topic=settings.dlq_topic,
            buffer_size=settings.impression_buffer,
            producer_factory=producer_factory or (lambda: kafka_producer(settings)),
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
        # Click tracking and attribution (serving/tracking.py): the shared signing secret, touches in Redis
        self.secret = secret_of(settings)
        self.touches = TouchStore(
            redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0),
            window_s=settings.attribution_window_s,
        )
        last_impression = settings.attribution_model == "impression"
        self.pipeline = RequestPipeline(self.selector, self.logger, touches=self.touches if last_impression else None)
        self._publish(state)

    @property
    def state(self) -> ServingState:
        return self.selector.state

    def click_url(self, touch: Touch) -> str:
        """The signed click-tracking URL of a served ad (`GET /c/{token}`)."""
        return f"{self.settings.public_url.rstrip('/')}/c/{encode_token(touch, self.secret)}"

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        # The background threads (impression drain, kafka-python's sender, pacing sync, ad-stats refresh) run
        # Python in bursts of milliseconds; a request waiting in the event loop gets the GIL back after at
        # most the switch interval (Python's default is 5 ms; the setting's is shorter: `bench.serve` compares).
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
        if self.settings.attribution_model == "impression":
            threads.append(threading.Thread(target=self.touches.run, name="touches", daemon=True, args=(self._stop,)))
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
    the imported libraries are hundreds of thousands of objects, and a full collection over them stalls
    every request (`python -m bench.gc_pause` times it), a p99 spike several times a minute under load. Requests'
    own garbage is still collected; what a frozen object holds is still freed by reference counting."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


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
