"""Prometheus metrics of the serving process (module constants, registered once in the default registry).

With several workers (`adloop serve --workers N`) each worker counts in files under
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set before the workers start, with
ADLOOP_METRICS_DIR naming the same folder) and `/metrics` sums them, so a scrape sees the whole server
whichever worker answers it. Gauges say how workers combine; the model version is a gauge of 1
(multiprocess mode has no `Info`).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# Set by `adloop serve --workers N` (with PROMETHEUS_MULTIPROC_DIR, the same folder) for its workers.
# Not PROMETHEUS_MULTIPROC_DIR itself: Feast sets that one too, to a folder of its own (feast.metrics).
WORKERS_DIR = os.environ.get("ADLOOP_METRICS_DIR")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)

REQUEST_SECONDS = Histogram("adloop_request_seconds", "Handler time per route.", ["route"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram(
    "adloop_stage_seconds", "Time per selection stage.", ["stage"], buckets=LATENCY_BUCKETS
)  # features, eligibility, rank, choose, total_select
BATCH_SIZE = Histogram(
    "adloop_select_batch_size", "Requests scored together per selection pass.", buckets=(1, 2, 4, 8, 16, 32, 64)
)
FALLBACKS = Counter("adloop_fallback_total", "Requests answered with a fallback, by reason.", ["reason"])
ERRORS = Counter("adloop_errors_total", "Errors caught while answering, by route and kind.", ["route", "kind"])
ARMS = Counter("adloop_arm_total", "Selection requests by arm.", ["arm"])
DEGRADED = Counter(
    "adloop_degraded_total", "Answers served while a dependency was degraded, by route and reason.", ["route", "reason"]
)
NO_FILL = Counter("adloop_no_fill_total", "Slots (or OpenRTB imps) left without an ad.", ["route"])
IMPRESSIONS = Counter(
    "adloop_impressions_total", "Impression events by outcome.", ["outcome"]
)  # enqueued, sent, dropped_buffer_full, failed
IMPRESSIONS_BUFFERED = Gauge(
    "adloop_impressions_buffered", "Impressions waiting for Kafka in the bounded buffers.", multiprocess_mode="livesum"
)
KAFKA_CONNECTED = Gauge(
    "adloop_kafka_connected", "1 while every worker's impression producer is connected.", multiprocess_mode="livemin"
)
MODEL_INFO = Gauge(
    "adloop_model_info", "1 for the model version serving (or the fallback).", ["version", "loaded"],
    multiprocess_mode="livemax",
)  # fmt: skip
CATALOG_ADS = Gauge("adloop_catalog_ads", "Ads in the loaded catalog.", multiprocess_mode="livemax")
CLICKS = Counter("adloop_clicks_total", "Tracked clicks, by outcome.", ["outcome"])  # new, duplicate, unbilled, forged
CONVERSIONS = Counter(
    "adloop_conversions_total", "Conversions, by outcome.", ["outcome"]
)  # attributed, unattributed, duplicate, forged
MODEL_LOAD_FAILURES = Counter(
    "adloop_model_load_failures", "Model versions that failed to load (the model serving was kept)."
)
MODEL_SWAPS = Counter("adloop_model_swaps", "Models swapped in by following the registry's promoted version.")
RELOADS = Counter("adloop_reloads_total", "Catalog / model reloads, by outcome.", ["outcome"])
GC_PAUSE_SECONDS = Histogram(
    "adloop_gc_pause_seconds", "Full (generation 2) collections of the cyclic GC: each pauses the whole process.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip

_model_labels: tuple[str, str] | None = None


@functools.lru_cache(maxsize=1024)
def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: prometheus_client checks the values and takes a lock on every
    `labels` call, and the request path labels seven times (stages, arm, route)."""
    return metric.labels(*values)


def publish_model(version: str, loaded: bool) -> None:
    """MODEL_INFO is 1 for this version; a previous one drops to 0 (multiprocess mode cannot remove it)."""
    global _model_labels
    labels = (version, str(loaded).lower())
    if _model_labels is not None and _model_labels != labels:
        MODEL_INFO.labels(*_model_labels).set(0)
    MODEL_INFO.labels(*labels).set(1)
    _model_labels = labels


def watch_gc() -> None:
    """Time every full collection into GC_PAUSE_SECONDS (once per process; the heap is frozen at start-up,
    `runtime.freeze_heap`, so these pauses scan only what requests and threads left alive since)."""
    if _time_full_collections not in gc.callbacks:
        gc.callbacks.append(_time_full_collections)


_gc_started = 0.0


def _time_full_collections(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if info["generation"] != 2:
        return
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        GC_PAUSE_SECONDS.observe(time.perf_counter() - _gc_started)


def exposition() -> bytes:
    """The text a scrape gets: this process's metrics, or every worker's summed in multiprocess mode."""
    if not WORKERS_DIR:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=WORKERS_DIR)
    return generate_latest(registry)
