"""`adloop learn`: retraining as a long-running service.

Every `learn_check_s` it counts the impressions on the events topic. When `learn_every_impressions`
new ones have been logged since the last training, or `learn_every_minutes` have passed with at
least one new impression (`models.refresh_policy`, the rule the Globo evaluation's refreshed rows
follow in event time), it trains a version from the served log (labelled impressions joined with
their Feast point-in-time features, `models.retrain.train_from_log`), evaluates it on the later
requests, and promotes it through the gate (`models.gate`). Serving processes follow the promoted
pointer by themselves (`serving.model_follow`). Each decision is one log line and a count in
`adloop_learn_decisions_total{decision}` on its own Prometheus port (`learn_metrics_port`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from adloop.settings import Settings
from models.refresh_policy import RefreshPolicy
from models.retrain import train_from_log
from streaming.events import Event, EventType
from streaming.topic_reader import read_events

log = logging.getLogger(__name__)

DECISIONS = Counter("adloop_learn_decisions", "Retraining decisions: promoted, refused, waiting, failed.", ["decision"])
NEW_IMPRESSIONS = Gauge("adloop_learn_new_impressions", "Impressions logged since the last training.")
LOGGED_IMPRESSIONS = Gauge("adloop_learn_logged_impressions", "Impressions on the events topic.")
TRAIN_SECONDS = Histogram("adloop_learn_train_seconds", "Training + gate time per run.",
                          buckets=(5, 10, 30, 60, 120, 300, 600, 1800))  # fmt: skip
LAST_RUN = Gauge("adloop_learn_last_run_timestamp_seconds", "When the last training run finished (unix s).")


class LearnService:
    def __init__(self, settings: Settings, *, read: Callable[[Settings], Iterable[Event]] | None = None):
        self.settings = settings
        self._read = read or read_events
        self.policy = RefreshPolicy(settings.learn_every_impressions, settings.learn_every_minutes)
        self.trained_at_count = 0  # impressions on the topic at the last training
        self.last_run = time.monotonic()  # the service's start counts as a run for the time trigger

    def step(self) -> dict[str, Any]:
        """One look at the log; trains when a trigger fired. Returns the decision (also logged, counted)."""
        events = list(self._read(self.settings))
        logged = sum(1 for e in events if e.event_type == EventType.ad_impression)
        new = logged - self.trained_at_count
        LOGGED_IMPRESSIONS.set(logged)
        NEW_IMPRESSIONS.set(new)
        minutes = (time.monotonic() - self.last_run) / 60
        due = self.policy.due(new, minutes)
        if due is None:
            return self._decide("waiting", new=new, minutes=round(minutes, 1))
        trigger = "impressions" if due == "events" else "time"
        started = time.monotonic()
        try:
            done = train_from_log(self.settings, events, click_window_s=self.settings.learn_click_window_s,
                                  promote=True)  # fmt: skip
        except ValueError as error:  # too few impressions or clicks: wait for more, do not count them as used
            return self._decide("waiting", new=new, trigger=trigger, reason=str(error))
        except Exception as error:
            log.exception("training from the served log failed")
            self.last_run = time.monotonic()
            return self._decide("failed", new=new, trigger=trigger, reason=f"{type(error).__name__}: {error}")
        TRAIN_SECONDS.observe(time.monotonic() - started)
        self.trained_at_count, self.last_run = logged, time.monotonic()
        LAST_RUN.set(time.time())
        gate = done.get("gate") or {}
        return self._decide("promoted" if done["promoted"] else "refused", version=done["version"], new=new,
                            trigger=trigger, reason=gate.get("reason"), against=gate.get("promoted"),
                            seconds=round(time.monotonic() - started, 1))  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # Kafka away for a while: the next check tries again
                log.exception("retraining check failed")
            stop.wait(self.settings.learn_check_s)

    def _decide(self, decision: str, **details: Any) -> dict[str, Any]:
        DECISIONS.labels(decision).inc()
        log.info("learn: %s %s", decision, " ".join(f"{k}={v}" for k, v in details.items() if v is not None))
        return {"decision": decision, **details}
