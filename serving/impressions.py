"""Impression logging: every served ad becomes an `ad_impression` event on Kafka, off the request path.

`ImpressionLogger.log()` only appends to a bounded in-memory buffer (a lock and a deque: no I/O,
no validation) and returns. A daemon thread encodes records straight to the contract's JSON
(`encode`: the JSON of the `streaming.events.Event` that `to_event` gives, without building it) and
hands them to kafka-python's producer (key = user id). When Kafka is down the logger still starts; the
thread retries the connection with a back-off while the buffer holds up to `buffer_size` records;
past that the oldest are dropped (counted in `adloop_impressions_total{outcome="dropped_buffer_full"}`)
so that the newest — the ones whose clicks are still to come — survive.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kafka.partitioner.default import murmur2

from adloop.settings import Settings
from serving import metrics
from serving.selection import SelectionRequest, SelectionResult
from streaming import kafka_clients
from streaming.events import MAX_ID, SCHEMA_VERSION, Event, EventType, encode_json, format_ts

log = logging.getLogger(__name__)
BATCH = 500  # records handed to the producer per wake-up
# The sender drains the buffer this often: impressions are not latency-critical, and fewer, larger sends
# cost the serving process's GIL less.
SEND_INTERVAL_S = 0.1


class ImpressionLogger:
    def __init__(
        self,
        *,
        topic: str,
        buffer_size: int = 10_000,
        producer_factory: Callable[[], Any],
        retry_s: float = 2.0,
    ):
        self.topic = topic
        self.buffer_size = buffer_size
        self.retry_s = retry_s
        self._factory = producer_factory  # builds a producer; called again after a failed connection
        self._buffer: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None
        self._healthy = False
        self._pending: deque[Any] = deque()  # kafka-python futures of the records sent, oldest first
        self._reap_lock = threading.Lock()
        self.counts = {"enqueued": 0, "sent": 0, "dropped_buffer_full": 0, "failed": 0}
        self.last_error: str | None = None

    # --- request side -----------------------------------------------------------------------

    def log(self, records: list[dict[str, Any]]) -> None:
        """Queue impression records (Event fields without event_id / ts); never blocks on Kafka."""
        if not records:
            return
        ts_ms = int(time.time() * 1000)
        with self._lock:
            dropped = max(0, len(self._buffer) + len(records) - self.buffer_size)
            for _ in range(min(dropped, len(self._buffer))):
                self._buffer.popleft()
            for record in records[max(0, len(records) - self.buffer_size) :]:
                record.setdefault("ts", ts_ms)
                self._buffer.append(record)
            size = len(self._buffer)
        self._count("enqueued", len(records))
        if dropped:
            self._count("dropped_buffer_full", dropped)
        metrics.IMPRESSIONS_BUFFERED.set(size)
        if size >= BATCH:  # otherwise the sender wakes on its own timer: no thread hand-off per request
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def connected(self) -> bool:
        """A producer exists and the last delivery (or the connect) succeeded."""
        return self._producer is not None and self._healthy

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="impression-logger", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (bounded by `timeout`), then stop."""
        deadline = time.monotonic() + timeout
        while self._buffer and self._producer is not None and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._producer is not None:
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
                self._producer.close(timeout=1)
            except Exception as error:
                log.warning("closing the impression producer: %s", error)
            self._reap()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the buffer is empty and the producer has delivered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        if self._producer is None:
            return False
        self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
        self._reap()  # flush returns once every record's future is done
        return not self._buffer

    # --- sender thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._producer is None and not self._connect():
                self._stop.wait(self.retry_s)
                continue
            self._wake.wait(SEND_INTERVAL_S)
            self._wake.clear()
            if not self._drain():
                self._stop.wait(self.retry_s)
            metrics.KAFKA_CONNECTED.set(1 if self.connected else 0)
            metrics.IMPRESSIONS_BUFFERED.set(len(self._buffer))

    def _drain(self) -> bool:
        """Hand the buffer to the producer, `BATCH` records at a time, and count what was delivered since
        the last drain; False: Kafka refused, retry later."""
        ok = True
        while ok and self._buffer and not self._stop.is_set():
            ok = self._send_batch()
        self._reap()
        return ok

    def _connect(self) -> bool:
        try:
            self._producer = self._factory()
            self._healthy = True
            metrics.KAFKA_CONNECTED.set(1)
            log.info("impression logger connected to Kafka")
            return True
        except Exception as error:
            self.last_error = f"connect: {error}"
            metrics.KAFKA_CONNECTED.set(0)
            log.warning("Kafka unavailable for impressions (%s); buffering, retry in %.0f s", error, self.retry_s)
            return False

    def _send_batch(self) -> bool:
        with self._lock:
            batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
        try:  # waits for the topic's metadata as `send` would (max_block_ms)
            partitions = sorted(self._producer.partitions_for(self.topic))
        except Exception as error:
            return self._put_back(batch, f"send: {error}")
        for i, record in enumerate(batch):
            try:
                key, value = encode(record)
            except Exception as error:  # a record that breaks the contract is a bug: count, log, go on
                self._count("failed", 1)
                log.error("impression record breaks the event contract: %s", error)
                continue
            try:
                future = self._producer.send(self.topic, key=key, value=value, partition=partition(key, partitions))
            except Exception as error:  # metadata unavailable: put the rest back in front, retry later
                return self._put_back(batch[i:], f"send: {error}")
            self._pending.append(future)  # counted by `_reap`: no callbacks per record in kafka-python's thread
        return True

    def _put_back(self, records: list[dict[str, Any]], error: str) -> bool:
        self.last_error, self._healthy = error, False
        with self._lock:
            self._buffer.extendleft(reversed(records))
        return False

    def _reap(self) -> None:
        """Count the deliveries kafka-python has finished since the last pass (one look at each pending future)."""
        sent = failed = 0
        healthy = None
        with self._reap_lock:  # the sender thread, `flush` and `close` all reap; `_send_batch` only appends
            pending = self._pending
            for _ in range(len(pending)):
                future = pending.popleft()
                if not future.is_done:  # still in flight (e.g. one partition's leader is away): next pass
                    pending.append(future)
                elif future.exception is None:
                    sent, healthy = sent + 1, True
                else:
                    failed, healthy, self.last_error = failed + 1, False, f"delivery: {future.exception}"
        if healthy is not None:
            self._healthy = healthy
        if sent:
            self._count("sent", sent)
        if failed:
            self._count("failed", failed)

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n
        metrics.IMPRESSIONS.labels(outcome).inc(n)


def impression_records(
    result: SelectionResult, request: SelectionRequest, costs: dict[tuple[str, str], float] | None = None
) -> list[dict[str, Any]]:
    """One record per served ad (fields of the `ad_impression` event); `costs`: (slot id, ad id) -> USD charged
    for the impression (CPM ads)."""
    costs = costs or {}
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
                    "cost": costs.get((slot_id, c.ad_id)),
                }
            )
    return records


def partition(key: bytes, partitions: list[int]) -> int:
    """The partition kafka-python's default partitioner picks for `key` among the topic's sorted `partitions`
    (murmur2, as the Java client): passing it to `send` skips the partitioner's per-record work."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


def encode(record: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of one impression's Kafka message: the user id and the contract's JSON.

    The value parses (`streaming.events.parse_event`) into the very `Event` that `to_event(record)`
    gives, without building one (a few us against ~20 for pydantic and `Event.to_bytes`). Type and
    range checks accept what `impression_records` builds; a record they do not accept
    goes through `to_event`, which has the last word and raises if it breaks the contract. Also
    raises on what cannot be sent at all (e.g. text with a lone surrogate)."""
    data = _checked(record)
    if data is None:
        event = to_event(record)
        return event.user_id.encode(), event.to_bytes()
    return data["user_id"].encode(), encode_json(data)


def to_event(record: dict[str, Any]) -> Event:
    """A record (what `log()` takes) as a contract `Event`: an impression, or the `event_type` it names (the
    click tracker's `ad_click` and the conversion routes' `conversion` travel the same way)."""
    return Event(
        event_id=record.get("event_id") or uuid.uuid4().hex,
        schema_version=SCHEMA_VERSION,
        event_type=EventType(record.get("event_type", EventType.ad_impression)),
        user_id=record["user_id"],
        ts=datetime.fromtimestamp(record["ts"] / 1000, tz=UTC),
        ad_id=record.get("ad_id"),
        campaign_id=record.get("campaign_id"),
        category=record.get("category"),
        request_id=record.get("request_id"),
        slot_id=record.get("slot_id"),
        position=record.get("position"),
        model_version=record.get("model_version"),
        arm=record.get("arm"),
        propensity=record.get("propensity"),
        source=record.get("source", "serve"),
        context=record.get("context") or None,
        value=record.get("value"),
        currency=record.get("currency"),
        cost=record.get("cost"),
    )


# --- the fast path of `encode` ------------------------------------------------------------------
# Event fields in the contract's order (as `Event.to_bytes` writes them), each with a check that only
# passes values pydantic would keep as they are: a record with anything else takes the slow path.
# The bytes are those of `Event.to_bytes` (one encoder: `streaming.events.encode_json`).
FAST_TS_MS = (946_684_800_000, 4_102_444_800_000)  # 2000-2100: ms / 1000 as a float rounds to the exact ms


def _is_id(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID


def _is_position(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_arm(value: Any) -> bool:
    return value == "targeted" or value == "control"


def _is_propensity(value: Any) -> bool:
    return type(value) is float and 0.0 < value <= 1.0


def _is_context(value: Any) -> bool:
    if type(value) is not dict:
        return False
    for key, item in value.items():
        kind = type(item)
        if type(key) is not str or not (
            kind is str
            or item is None
            or kind is bool
            or (kind is int and -(2**63) <= item < 2**63)  # orjson's range
            or (kind is float and math.isfinite(item))
        ):
            return False
    return True


OPTIONAL_FIELDS = (
    ("category", _is_id),
    ("ad_id", _is_id),
    ("campaign_id", _is_id),
    ("request_id", _is_id),
    ("slot_id", _is_id),
    ("position", _is_position),
    ("model_version", _is_id),
    ("arm", _is_arm),
    ("propensity", _is_propensity),
)


def _checked(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record as the contract's JSON object (keys in field order, no nulls), or None: take the slow path."""
    if record.get("event_type", "ad_impression") != "ad_impression" or "source" in record:
        return None  # clicks and conversions are few: `to_event` encodes them
    event_id = record.get("event_id") or uuid.uuid4().hex
    user_id, ts = record.get("user_id"), record.get("ts")
    if not (_is_id(event_id) and _is_id(user_id) and _is_id(record.get("ad_id"))):
        return None
    if type(ts) is not int or not FAST_TS_MS[0] <= ts < FAST_TS_MS[1]:
        return None
    data = {"event_id": event_id, "schema_version": SCHEMA_VERSION, "event_type": "ad_impression",
            "user_id": user_id, "ts": format_ts(ts)}  # fmt: skip
    for name, valid in OPTIONAL_FIELDS:
        value = record.get(name)
        if value is not None:
            if not valid(value):
                return None
            data[name] = value
    data["source"] = "serve"
    context = record.get("context")
    if context:  # to_event: `or None`, an empty context is left out
        if not _is_context(context):
            return None
        data["context"] = context
    cost = record.get("cost")
    if cost is not None:
        if type(cost) is not float or not (math.isfinite(cost) and cost >= 0):
            return None
        data["cost"] = cost
    return data


def kafka_producer(settings: Settings) -> Any:
    """The impression producer: batched per drain, bounded waits so the logger notices an outage quickly."""
    return kafka_clients.producer(
        settings,
        acks="all",
        linger_ms=50,  # batches of a 100 ms drain go out in one request per partition
        # ... in one batch per partition: the default 16 KiB holds a few dozen impressions, so a larger drain
        # (or up to BATCH records after a backlog) would open more batches and wake the network thread more
        # (`python -m bench.impressions` compares)
        batch_size=256 * 1024,
        bootstrap_timeout_ms=3000,
        max_block_ms=2000,
        request_timeout_ms=5000,
        delivery_timeout_ms=30_000,
        retries=5,
    )
