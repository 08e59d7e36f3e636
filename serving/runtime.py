"""The lifecycle of a serving process: build its long-lived parts once (`app.lifespan`), start their
background threads, reload the catalog and model without a restart, stop.

`Runtime` owns the catalog + model (`ServingState`, swapped whole on reload: a request in flight
keeps the state it started with, so a reload drops nothing), the selector, the Redis clients, the
impression logger and the background threads (ad-stats refresh, catalog file watch, pacing sync, the
model registry's follower `serving.model_follow`, which also retries a feature reader that could not
be built). `readiness()` reports each dependency, and what is degraded and why.
The request path itself is `serving.pipeline.RequestPipeline` (`runtime.pipeline`). No FastAPI.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import threadpoolctl
import torch

from adloop.settings import Settings
from features.redis_client import is_cluster
from serving import metrics
from serving.catalog import Catalog, load_catalog
from serving.features_access import AdStats, GuardedReader, NoFeatures, request_path_redis, run_refresher
from serving.impressions import ImpressionLogger, kafka_producer
from serving.model_follow import ModelFollower
from serving.pacing import DAY_S, Pacer, adopt_legacy_spend
from serving.pipeline import RequestPipeline
from serving.protocols import FeatureReader, ModelRegistry
from serving.redis_async import AsyncRedis, AsyncRedisCluster, async_redis_client
from serving.redis_lazy import open_redis
from serving.selection import Selector
from serving.selection_types import SelectionConfig
from serving.serving_state import ServingState
from serving.signing import secret_of
from serving.tracking import Touch, TouchStore, encode_token

log = logging.getLogger(__name__)
AsyncClient = AsyncRedis | AsyncRedisCluster
START_READ_CHUNK = 1000  # ads per round trip of the start-up read (no request waits on it: larger than a refresh's)


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
        # Likewise numpy's BLAS: a batch's (b, n) retrieval matmul is a GEMM, which OpenBLAS splits over
        # threads whose spinning costs more CPU than they save (compare `OPENBLAS_NUM_THREADS=1` and not
        # with `python -m bench.select_path --batch 16`).
        threadpoolctl.threadpool_limits(1, user_api="blas")
        budget_s = settings.request_budget_ms / 1000
        self.redis = request_path_redis(settings, timeout_s=budget_s)  # standalone or cluster, by the settings
        self.async_redis = async_redis_client(settings, timeout_s=budget_s)  # the routes' user reads
        self._default_reader = feature_reader is None  # only the default one is rebuilt when it is missing
        self.reader = feature_reader or default_reader(self.redis, settings, self.async_redis)
        self.reader_error: str | None = _missing_reader_reason(self.reader)
        self.registry = registry or default_registry(settings)
        self.follower = ModelFollower(self.registry)
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
        state = ServingState(catalog, self.follower.load_promoted(None), index_min_ads=settings.serve_index_min_ads)
        # the pacing thread rechecks the budgets' mask (after each sync), so that no request pays for it
        self.pacer = Pacer(catalog, slack=settings.pacing_slack, background=settings.pacing_sync_s > 0)
        self.ad_stats = AdStats(catalog)
        config = SelectionConfig(
            top_k=settings.serve_top_k,
            epsilon=settings.serve_epsilon,
            epsilon_no_model=settings.serve_epsilon_no_model,
            control_share=settings.control_share,
            control_salt=settings.control_salt,
        )
        self.guarded = GuardedReader(self.reader, retry_after_s=settings.redis_retry_after_s)
        self.selector = Selector(state, config, pacer=self.pacer, ad_stats=self.ad_stats, features=self.guarded)
        # Click tracking and attribution (serving/tracking.py): the shared signing secret, touches in Redis
        self.secret = secret_of(settings)
        self.touches = TouchStore(
            open_redis(settings, timeout_s=1.0),
            window_s=settings.attribution_window_s,
        )
        last_impression = settings.attribution_model == "impression"
        self.pipeline = RequestPipeline(
            self.selector,
            self.logger,
            touches=self.touches if last_impression else None,
            batch_window_s=settings.serve_batch_window_ms / 1000,
            max_batch=settings.serve_batch_max,
        )
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
        self._read_ad_stats()
        threads = [
            threading.Thread(
                target=run_refresher,
                name="ad-stats",
                daemon=True,
                args=(self.ad_stats, _CurrentReader(self), lambda: self.state.catalog),
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
        if self.settings.model_poll_s > 0:
            threads.append(threading.Thread(target=self._follow_registry, name="model-follow", daemon=True))
        for thread in threads:
            thread.start()

    def _read_ad_stats(self) -> None:
        """Every ad's online row, read before the first request: ranked on priors a new process would serve worse
        ads until its refresher got round to them, and a throttled first read of a million ads would share the
        GIL with requests for a minute and more. Redis down: priors, and the refresher keeps trying."""
        started = time.monotonic()
        try:
            self.ad_stats.refresh(_CurrentReader(self), self.state.catalog, chunk=START_READ_CHUNK, gil_share=1.0)
        except Exception as error:
            log.warning("ad stats not read at start (%s): priors until the refresher reads them", error)
            return
        log.info("ad stats of %d ads read in %.1f s", len(self.state.catalog), time.monotonic() - started)

    def stop(self) -> None:
        self._stop.set()
        self.logger.close(timeout=3.0)
        self.redis.close()
        self.async_redis.close()

    def reload(self, *, everywhere: bool = False) -> dict[str, Any]:
        """Re-read the catalog file and the promoted model; swap them in at once. Raises on a bad catalog
        (the old state keeps serving); a model that fails to load keeps the old model serving (reported
        by `readiness`). everywhere: also ask every other process following the registry to reload
        (the admin route: with `--workers N` the call reaches one worker)."""
        with self._reload_lock:
            old = self.state
            try:
                catalog = self._load_catalog()
            except Exception:
                metrics.RELOADS.labels("failed").inc()
                raise
            model = self.follower.load_promoted(old.model)
            state = ServingState(catalog, model, index_min_ads=self.settings.serve_index_min_ads)
            self.pacer.rebase(catalog)
            self.ad_stats.reset(catalog)
            self.selector.state = state
            self.follower.swapped(old.model, model)
            self._publish(state)
            metrics.RELOADS.labels("failed" if self.follower.failure else "ok").inc()
            freeze_heap()  # the new catalog and model join the frozen heap (one pause per reload)
        if everywhere:
            self.follower.request_reload()
        threading.Thread(target=self._refresh_stats_once, daemon=True).start()
        return self.describe()

    def follow_once(self) -> bool:
        """One look at the registry (the follower thread's step; tests call it): True when the model or the
        catalog changed. Also rebuilds a feature reader that could not be built."""
        self._retry_reader()
        step = self.follower.poll(self.state.model)
        if step is None:
            return False
        action, model = step
        if action == "reload":
            try:
                self.reload()
            except Exception:
                log.exception("reload asked through the registry failed; the old catalog keeps serving")
                return False
            return True
        with self._reload_lock:
            old = self.state
            state = ServingState(old.catalog, model, index_min_ads=self.settings.serve_index_min_ads)
            self.selector.state = state
            self.follower.swapped(old.model, model)
            self._publish(state)
            metrics.MODEL_SWAPS.inc()
            freeze_heap()
        return True

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {
            "catalog_version": state.catalog.version,
            "ads": len(state.catalog),
            "model_version": state.model_version,
            "model_loaded": state.model is not None,
            "model_failed": self.follower.describe()["failed"],
        }

    def readiness(self) -> dict[str, Any]:
        """Each dependency's check. `ready` needs the catalog, Redis and Kafka (a missing or stale model still
        serves, with the fallback ranking or the older version); `degraded` names every dependency that is
        not as it should be, with the reason, whether or not it blocks readiness."""
        try:
            redis_ok, redis_error = bool(self.redis.ping()), None
        except Exception as error:
            redis_ok, redis_error = False, f"{type(error).__name__}: {error}"
        state = self.state
        follow = self.follower.describe()
        model_reason = None
        if follow["failed"]:
            failed = follow["failed"]
            model_reason = f"{failed['version']} failed to load ({failed['reason']}); {state.model_version} serves"
        elif state.model is None:
            model_reason = "no model promoted: fallback ranking (live CTR x bid)"
        elif follow["promoted"] and follow["promoted"] != state.model_version:
            model_reason = f"{follow['promoted']} is promoted; {state.model_version} serves until it loads"
        checks = {
            "catalog": {"ok": len(state.catalog) > 0, "ads": len(state.catalog), "version": state.catalog.version,
                        "reason": None if len(state.catalog) else "the catalog has no ads"},
            "redis": {"ok": redis_ok, "reason": redis_error},
            "features": {"ok": self.reader_error is None, "reason": self.reader_error},
            "kafka": {"ok": self.logger.connected, "buffered": self.logger.buffered, "error": self.logger.last_error,
                      "reason": None if self.logger.connected else
                      f"impressions buffered in memory ({self.logger.buffered}): {self.logger.last_error}"},
            "model": {"ok": model_reason is None, "version": state.model_version, "loaded": state.model is not None,
                      "reason": model_reason, **follow},
        }  # fmt: skip
        blocking = ("catalog", "redis", "kafka")
        return {
            "ready": all(checks[name]["ok"] for name in blocking),
            "model_version": state.model_version,
            "pid": os.getpid(),
            "degraded": {name: c["reason"] for name, c in checks.items() if not c["ok"]},
            "checks": checks,
        }

    # --- helpers ----------------------------------------------------------------------------

    def _load_catalog(self) -> Catalog:
        path = Path(self.settings.catalog_path)
        self._catalog_mtime = path.stat().st_mtime
        return load_catalog(path)

    def _follow_registry(self) -> None:
        while not self._stop.wait(self.settings.model_poll_s):
            try:
                self.follow_once()
            except Exception:  # a registry on a flaky file system: the next poll tries again
                log.exception("following the model registry failed; the current model keeps serving")

    def _retry_reader(self) -> None:
        """The default feature reader could not be built (no Feast registry yet): try again; once built it
        replaces the stand-in, and responses stop being flagged `no_feature_store`."""
        if self.reader_error is None or not self._default_reader:
            return
        try:
            reader = feast_reader(self.redis, self.settings, self.async_redis)
        except Exception as error:
            self.reader_error = f"no Feast registry: {type(error).__name__}: {error}"
            return
        self.reader, self.guarded.reader, self.reader_error = reader, reader, None
        log.info("feature reader built: user and ad features are read from Redis")

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
        client = open_redis(self.settings, timeout_s=2.0)
        if not is_cluster(self.settings):  # a cluster never held the untagged ledger (its script was refused)
            try:
                if merged := adopt_legacy_spend(client, int(time.time() // DAY_S)):
                    log.info("pacing: %d spend fields of the untagged ledger merged into adloop:{spend}:*", merged)
            except Exception as error:
                log.warning("pacing: the untagged spend ledger could not be merged (%s); retried at next start", error)
        failing = False
        while not self._stop.wait(self.settings.pacing_sync_s):
            try:
                self.pacer.sync(client)
                failing = False
            except Exception as error:
                if not failing:  # once per outage, not once per second
                    log.warning("pacing sync failed (%s): this process paces alone until Redis answers", error)
                failing = True
                self.pacer.recheck()  # the day's allowance grows while Redis is away too
        client.close()

    def _refresh_stats_once(self) -> None:
        try:
            self.ad_stats.refresh(self.reader, self.state.catalog)
        except Exception as error:
            log.warning("ad stats refresh after reload failed: %s", error)


class _CurrentReader:
    """The runtime's reader as it is now (the ad-stats thread outlives a reader rebuilt by `_retry_reader`)."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime.reader, name)


def _missing_reader_reason(reader: FeatureReader) -> str | None:
    return getattr(reader, "reason", None) if isinstance(reader, NoFeatures) else None


def freeze_heap() -> None:
    """Take everything alive now out of the cyclic GC's reach (`gc.freeze`): the catalog, the model and
    the imported libraries are hundreds of thousands of objects, and a full collection over them stalls
    every request (`python -m bench.gc_pause` times it), a p99 spike several times a minute under load. Requests'
    own garbage is still collected; what a frozen object holds is still freed by reference counting."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def default_reader(client: Any, settings: Settings, async_client: AsyncClient | None = None) -> FeatureReader:
    """Feast's Redis layout read directly (features/online.py), or `NoFeatures` (with its reason) while
    the Feast registry is missing."""
    try:
        return feast_reader(client, settings, async_client)
    except Exception as error:  # no registry yet (`adloop stack up` applies it): serve flagged, retry
        log.warning("Feast registry unavailable (%s): answers are flagged no_feature_store until it is applied "
                    "(`adloop stack up` or `adloop features apply`); retried every model poll", error)  # fmt: skip
        return NoFeatures(f"no Feast registry: {type(error).__name__}: {error}")


def feast_reader(client: Any, settings: Settings, async_client: AsyncClient | None = None) -> FeatureReader:
    """The reader of Feast's Redis layout; the layout comes from the Feast registry (raises without one)."""
    from features.online import FeastLayout, OnlineFeatureReader

    return OnlineFeatureReader(client, FeastLayout.from_settings(settings), async_client)


def default_registry(settings: Settings) -> ModelRegistry:
    from models.registry import Registry

    return Registry.from_settings(settings)
