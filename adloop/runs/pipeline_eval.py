"""A saved model scored on a MIND-format log through the real pipeline: Kafka, the feature consumer, Redis.

`adloop evaluate PATH --model VERSION --pipeline`. The log's events (`streaming.replay.mind`, what
`adloop replay --format mind` sends) go to a fresh topic, a `FeatureConsumer` folds them into a Redis
database of their own, and every request of the log's last day is scored from the online features
as serving reads them (`OnlineFeatureReader`: the user's row, the candidates' ad rows), before its own
impressions and clicks are sent:

    for each time at which requests happen (in order):
        send the events before those requests (and the new users' history), wait until applied
        score the requests from Redis; then send their impressions (their clicks follow 1 s later)

Requests that share a time do not see each other, as in `models.mind.Replay`, whose in-process
figures these must equal (tests/models/test_pipeline_eval.py). Days before the last are sent in one
go, unscored. The topic pair and the Feast folder are temporary; the Redis database
(`ADLOOP_EVAL_REDIS_DB`) is emptied before and after.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adloop.runs.isolated import isolated_settings
from adloop.settings import Settings
from features.online import FeastLayout, OnlineFeatureReader
from features.redis_client import redis_client as open_redis
from models.bundle import ModelBundle
from models.ranker import AD_SCALARS
from streaming import kafka_clients
from streaming.consumer import FeatureConsumer
from streaming.events import Event, EventType
from streaming.replay import mind as replay_mind

DAY_MS = 86_400_000
AD_ROW = (*AD_SCALARS, "ad_last_seen_ms")


def score_through_pipeline(
    settings: Settings, behaviors: Path, bundle: ModelBundle, *, progress: Callable[[int, int], None] | None = None
) -> pd.DataFrame:
    """(request_id, ad_id, label, prob) of every candidate of the log's last UTC day, scored from Redis."""
    events = list(replay_mind.read(behaviors))
    requests = _requests(events)
    last_day = max(ts for ts, _ in requests.values()) // DAY_MS
    folder = Path(tempfile.mkdtemp(prefix="adloop-eval-"))
    isolated = isolated_settings(settings, folder, redis_db=settings.eval_redis_db, prefix="adloop.eval",
                                 empty_after=True, consumer_batch_ms=20)  # fmt: skip
    try:
        with isolated as eval_settings, _Pipeline(eval_settings) as pipeline:
            rows: list[dict[str, Any]] = []
            batches = _batches(events, requests)
            scored = [b for b in batches if b.ts // DAY_MS == last_day]
            pipeline.send([e for b in batches if b.ts // DAY_MS < last_day for e in b.before + b.after])
            for done, batch in enumerate(scored, start=1):
                pipeline.send(batch.before)
                pipeline.wait()
                for request_id in batch.request_ids:
                    rows.extend(_score(pipeline.reader, bundle, request_id, batch.ts, requests[request_id][1]))
                pipeline.send(batch.after)
                if progress:
                    progress(done, len(scored))
        return pd.DataFrame(rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Batch:
    """The events around the requests that share one time: `before` them (the new users' history),
    then `after` (their impressions and what follows up to the next requests' time)."""

    def __init__(self, ts: int) -> None:
        self.ts = ts
        self.request_ids: list[str] = []
        self.before: list[Event] = []
        self.after: list[Event] = []


def _requests(events: list[Event]) -> dict[str, tuple[int, list[Event]]]:
    """request id -> (time ms, its ad_impression and ad_click events)."""
    out: dict[str, tuple[int, list[Event]]] = {}
    for e in events:
        if e.event_type in (EventType.ad_impression, EventType.ad_click) and e.request_id:
            if e.request_id not in out:
                out[e.request_id] = (e.ts_ms, [])
            out[e.request_id][1].append(e)
    return out


def _batches(events: list[Event], requests: dict[str, tuple[int, list[Event]]]) -> list[_Batch]:
    """The stream cut at each time T at which requests happen. `before` T's scoring: the events up to T
    that are not T's impressions (new users' history, interleaved with the impressions of the requests
    before them); `after`: T's impressions and the events after T (their clicks...). A user's own events
    keep their order; only other users' page views move ahead of an impression."""
    batches = [_Batch(-1)]  # what precedes the first request
    for e in events:
        if e.event_type == EventType.ad_impression and e.position == 1:
            ts = requests[e.request_id][0]
            if ts != batches[-1].ts:
                batches.append(_Batch(ts))
            batches[-1].request_ids.append(e.request_id)
        batch = batches[-1]
        (batch.before if e.event_type != EventType.ad_impression and e.ts_ms <= batch.ts else batch.after).append(e)
    head = batches.pop(0)
    if batches:
        batches[0].before = head.after + batches[0].before
    return batches


def _score(
    reader: OnlineFeatureReader, bundle: ModelBundle, request_id: str, ts_ms: int, events: list[Event]
) -> list[dict[str, Any]]:
    """One request's candidates scored as serving would, from the online rows the consumer wrote."""
    shown = sorted((e for e in events if e.event_type == EventType.ad_impression), key=lambda e: e.position)
    clicked = {e.ad_id for e in events if e.event_type == EventType.ad_click}
    ad_ids = [e.ad_id for e in shown]
    user = reader.user(shown[0].user_id)
    stats = reader.ads(ad_ids)
    frame = {
        "ad_id": np.array(ad_ids, dtype=object),
        "category": np.array([e.category for e in shown], dtype=object),
        "campaign_id": np.array([e.campaign_id for e in shown], dtype=object),
        "position": np.array([e.position for e in shown], dtype=float),
        **{name: [stats.get(a, {}).get(name) for a in ad_ids] for name in AD_ROW},
    }
    attributes = {"ad_id": ad_ids, "category": list(frame["category"]), "campaign_id": list(frame["campaign_id"])}
    emb = bundle.embed_ads(attributes) @ bundle.user_vector(user)  # (candidates,)
    hour = datetime.fromtimestamp(ts_ms / 1000, tz=UTC).hour
    context = {"ts_ms": ts_ms, "hour": hour, "slate_size": len(ad_ids)}
    probs = bundle.predict_ctr(user, frame, context, emb)
    return [{"request_id": request_id, "ad_id": a, "label": int(a in clicked), "prob": float(p)}
            for a, p in zip(ad_ids, probs, strict=True)]  # fmt: skip


class _Pipeline:
    """A producer and a consumer thread on the evaluation's own topic; `wait` until all sent is applied."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = open_redis(settings)
        self.reader = OnlineFeatureReader(self.client, FeastLayout.from_settings(settings))
        self.producer = kafka_clients.producer(settings, linger_ms=0)
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def __enter__(self) -> _Pipeline:
        """Starts the consumer once it holds the topic's partitions. Nothing is sent before that: a burst of
        sends while it was joining its group, and once a busy process, left kafka-python 3.0.12's consumer
        without partitions for minutes; a consumer that got none in 15 s is replaced (a new group)."""
        for _ in range(3):
            self._stop.clear()
            self.consumer = FeatureConsumer(self.settings, redis_client=self.client,
                                            group=f"adloop-eval-{uuid.uuid4().hex}")  # fmt: skip
            self._thread = threading.Thread(target=self._consume, daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 15
            while self._thread.is_alive() and time.monotonic() < deadline:
                if self.consumer.consumer.assignment():
                    return self
                time.sleep(0.01)
            self._stop.set()
            self._thread.join(timeout=10)
        raise RuntimeError(f"the evaluation's consumer got no partitions ({self.error or 'three joins timed out'})")

    def _consume(self) -> None:
        try:
            self.consumer.run(stop=self._stop.is_set)
        except BaseException as error:  # said by `__enter__` and `wait`
            self.error = error

    def send(self, events: list[Event]) -> None:
        for e in events:
            self.producer.send(self.settings.events_topic, key=e.user_id.encode(), value=e.to_bytes())
        self.sent += len(events)

    def wait(self, timeout_s: float = 60.0) -> None:
        self.producer.flush()
        deadline = time.monotonic() + timeout_s
        while self.consumer.total.handled < self.sent:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                why = f" ({type(self.error).__name__}: {self.error})" if self.error else ""
                raise RuntimeError(f"the consumer applied {self.consumer.total.handled} of {self.sent} events{why}")
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.producer.close(timeout=5)
