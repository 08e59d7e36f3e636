"""Prometheus metrics of the feature consumer (exposed by `adloop consume` on settings.consumer_metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS_APPLIED = Counter("adloop_consumer_events_applied_total", "Events folded into features.")
DUPLICATES = Counter("adloop_consumer_duplicates_total", "Events skipped because their event_id was already applied.")
ERASED = Counter(
    "adloop_consumer_erased_events_total", "Events skipped: their user was erased at or after the event's time."
)
DEAD_LETTERED = Counter("adloop_consumer_dead_lettered_total", "Events sent to the dead-letter topic.", ["reason"])
BATCH_SECONDS = Histogram(
    "adloop_consumer_batch_seconds", "Time to apply one micro-batch end to end.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)  # fmt: skip


def record_batch(applied: int, duplicates: int, dead_lettered: dict[str, int], seconds: float) -> None:
    EVENTS_APPLIED.inc(applied)
    DUPLICATES.inc(duplicates)
    for reason, count in dead_lettered.items():
        DEAD_LETTERED.labels(reason=reason).inc(count)
    BATCH_SECONDS.observe(seconds)
