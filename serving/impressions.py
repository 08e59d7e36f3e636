"""Impression logging: every served ad becomes an `ad_impression` event on Kafka, off the request path.

`ImpressionLogger.log()` only appends to a bounded in-memory buffer (a lock and a deque: no I/O,
no validation) and returns. A daemon thread encodes records straight to the contract's JSON
(`serving.impression_records.encode`: the JSON of the contract `Event`, without building it) and
hands them to kafka-python's producer (key = user id). Nothing is lost without a count and a log line
naming the impression (`adloop_impressions_total{outcome}`):
- Kafka down: the logger still starts; the thread retries the connection with a back-off while the
  buffer holds up to `buffer_size` records; past that the oldest are dropped (`dropped_buffer_full`,
  their event ids logged) so that the newest — the ones whose clicks are still to come — survive.
- An outage longer than the producer's delivery timeout: the records that expired go back into the
  buffer (`requeued`; the same bound applies) and are sent again once Kafka answers. At most
  `MAX_IN_FLIGHT` records wait inside kafka-python; the rest wait in the bounded buffer.
- The producer is not idempotent (`kafka_producer`): kafka-python 3's idempotent producer never sends
  again once one of its batches has expired. One request in flight per connection keeps retries in order.
- A record that cannot be encoded, or whose event exceeds the contract's 16 KiB, is never retried:
  it goes to the dead-letter topic with its reason (`dead_lettered`); an oversized one's JSON is cut
  to `DEAD_LETTER_SAMPLE_BYTES` there (the original size in a header).
- A delivery the broker refuses for good (not retriable) is dead-lettered the same way; a dead letter
  that cannot be delivered either is `lost`, logged with the impression's id.
- `connected` (readiness) turns false when a record handed to Kafka has waited `STALL_S` without an
  answer, so an outage shows within seconds, not after the delivery timeout.
- `close(timeout)` sends what it can within the bound and counts the rest as `unsent_at_shutdown`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from adloop.settings import Settings
from serving import metrics
from serving.impression_records import encode, partition
from streaming import kafka_clients
from streaming.events import MAX_EVENT_BYTES

log = logging.getLogger(__name__)
BATCH = 500  # records handed to the producer per wake-up
# The sender drains the buffer this often: impressions are not latency-critical, and fewer, larger sends
# cost the serving process's GIL less.
SEND_INTERVAL_S = 0.1
MAX_IN_FLIGHT = 4 * BATCH  # records handed to kafka-python and not yet answered; the rest wait in the buffer
STALL_S = 3.0  # a record handed to Kafka and unanswered this long: Kafka counts as down (readiness)
DEAD_LETTER_SAMPLE_BYTES = 8 * 1024  # of an oversized impression's JSON, kept in its dead letter
LOGGED_IDS = 200  # event ids per log line of dropped or unsent impressions
OUTCOMES = ("enqueued", "sent", "requeued", "dropped_buffer_full", "dead_lettered", "lost", "unsent_at_shutdown")


class ImpressionLogger:
    def __init__(
        self,
        *,
        topic: str,
        dlq_topic: str | None = None,
        buffer_size: int = 10_000,
        producer_factory: Callable[[], Any],
        retry_s: float = 2.0,
    ):
        self.topic = topic
        self.dlq_topic = dlq_topic or f"{topic}.dlq"
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
        # (future, record or None for a dead letter, event id, monotonic time handed over), oldest first
        self._pending: deque[tuple[Any, dict[str, Any] | None, str, float]] = deque()
        self._reap_lock = threading.Lock()
        self._dropped_ids: list[str] = []  # dropped since the sender last logged them
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.last_error: str | None = None

    # --- request side -----------------------------------------------------------------------

    def log(self, records: list[dict[str, Any]]) -> None:
        """Queue impression records (Event fields; `event_id` and `ts` are filled in when absent); never
        blocks on Kafka."""
        if not records:
            return
        ts_ms = int(time.time() * 1000)
        for record in records:
            record.setdefault("ts", ts_ms)
            if not record.get("event_id"):
                record["event_id"] = uuid.uuid4().hex  # so that a dropped one can be named
        with self._lock:
            dropped = self._append(records, front=False)
            size = len(self._buffer)
        self._count("enqueued", len(records))
        if dropped:
            self._count("dropped_buffer_full", dropped)
        metrics.IMPRESSIONS_BUFFERED.set(size)
        if size >= BATCH:  # otherwise the sender wakes on its own timer: no thread hand-off per request
            self._wake.set()

    def _append(self, records: list[dict[str, Any]], *, front: bool) -> int:
        """Add to the buffer (under the lock), dropping the oldest beyond `buffer_size`; how many were dropped."""
        if front:
            self._buffer.extendleft(reversed(records))
        else:
            self._buffer.extend(records)
        dropped = max(0, len(self._buffer) - self.buffer_size)
        for _ in range(dropped):
            self._dropped_ids.append(self._buffer.popleft()["event_id"])
        return dropped

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def connected(self) -> bool:
        """A producer exists, the last delivery (or the connect) succeeded and none has waited `STALL_S`."""
        if self._producer is None or not self._healthy:
            return False
        try:
            oldest = self._pending[0]
        except IndexError:
            return True
        return oldest[0].is_done or time.monotonic() - oldest[3] < STALL_S

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="impression-logger", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (bounded by `timeout`), then stop; what is still unsent is counted and named."""
        deadline = time.monotonic() + timeout
        while self._buffer and self._producer is not None and self.connected and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._producer is not None:
            try:
                self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as error:
                log.warning("flushing the impression producer: %s", error)
            self._reap(requeue=False)
        with self._lock:
            unsent = [r["event_id"] for r in self._buffer] + [item[2] for item in self._pending]
            self._buffer.clear()
        self._pending.clear()
        if unsent:
            self._count("unsent_at_shutdown", len(unsent))
            _log_ids(logging.ERROR, "impressions unsent at shutdown", unsent)
        self._log_dropped()
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception as error:
                log.warning("closing the impression producer: %s", error)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the buffer is empty and every record handed to Kafka is answered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while (self._buffer or self._pending) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        if self._producer is None:
            return False
        self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
        self._reap()
        return not self._buffer and not self._pending

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
            self._log_dropped()
            metrics.KAFKA_CONNECTED.set(1 if self.connected else 0)
            metrics.IMPRESSIONS_BUFFERED.set(len(self._buffer))

    def _drain(self) -> bool:
        """Hand the buffer to the producer, `BATCH` records at a time while fewer than `MAX_IN_FLIGHT` wait
        for an answer, and count what was answered since the last drain; False: Kafka refused, retry later."""
        ok = True
        self._reap()
        while ok and self._buffer and len(self._pending) < MAX_IN_FLIGHT and not self._stop.is_set():
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
            except Exception as error:  # not a contract event: no retry can help
                self._dead_letter(record, "unencodable", str(error))
                continue
            if len(value) > MAX_EVENT_BYTES:
                self._dead_letter(record, "oversized", f"{len(value)} bytes > {MAX_EVENT_BYTES}", value=value)
                continue
            try:
                future = self._producer.send(self.topic, key=key, value=value, partition=partition(key, partitions))
            except Exception as error:
                if getattr(error, "retriable", False):  # metadata unavailable: the rest back in front, retry later
                    return self._put_back(batch[i:], f"send: {error}")
                self._dead_letter(record, "rejected", repr(error))
                continue
            # counted by `_reap`: no callbacks per record in kafka-python's thread
            self._pending.append((future, record, record["event_id"], time.monotonic()))
        return True

    def _put_back(self, records: list[dict[str, Any]], error: str) -> bool:
        self.last_error, self._healthy = error, False
        with self._lock:
            dropped = self._append(records, front=True)
        if dropped:
            self._count("dropped_buffer_full", dropped)
        return False

    def _dead_letter(self, record: dict[str, Any], reason: str, detail: str, *, value: bytes | None = None) -> None:
        """Send a record that must not be retried to the dead-letter topic, with why (never blocks the rest)."""
        event_id = str(record.get("event_id"))
        log.error("impression %s dead-lettered (%s): %s", event_id, reason, detail[:500])
        if value is None:
            value = json.dumps(record, default=repr, ensure_ascii=True).encode()  # lone surrogates escaped
        headers = [
            ("adloop.reason", reason.encode()),
            ("adloop.detail", detail[:1000].encode("utf-8", "backslashreplace")),
            ("adloop.source.topic", b"serving"),
            ("adloop.event_id", event_id.encode("utf-8", "backslashreplace")),
            ("adloop.size", str(len(value)).encode()),
        ]
        try:
            future = self._producer.send(self.dlq_topic, value=value[:DEAD_LETTER_SAMPLE_BYTES], headers=headers)
        except Exception as error:
            self._lost(event_id, f"dead letter not sent: {error!r}")
            return
        self._pending.append((future, None, event_id, time.monotonic()))

    def _reap(self, *, requeue: bool = True) -> None:
        """Count the deliveries kafka-python has finished since the last pass (one look at each pending future);
        a record whose delivery expired goes back into the buffer."""
        sent = dead = 0
        healthy = None
        retry: list[dict[str, Any]] = []
        with self._reap_lock:  # the sender thread, `flush` and `close` all reap; `_send_batch` only appends
            pending = self._pending
            for _ in range(len(pending)):
                item = pending.popleft()
                future, record, event_id, _ = item
                if not future.is_done:  # still in flight (e.g. one partition's leader is away): next pass
                    pending.append(item)
                elif future.exception is None:
                    healthy = True
                    if record is None:
                        dead += 1
                    else:
                        sent += 1
                else:
                    error = future.exception
                    healthy, self.last_error = False, f"delivery: {error}"
                    if record is None:
                        self._lost(event_id, f"dead letter not delivered: {error!r}")
                    elif getattr(error, "retriable", False) and requeue:
                        retry.append(record)
                    elif getattr(error, "retriable", False):
                        pending.append((_Done(), record, event_id, 0.0))  # closing: counted as unsent
                    else:
                        self._dead_letter(record, "rejected", repr(error))
        if healthy is not None:
            self._healthy = healthy
        if sent:
            self._count("sent", sent)
        if dead:
            self._count("dead_lettered", dead)
        if retry:
            self._count("requeued", len(retry))
            with self._lock:
                dropped = self._append(retry, front=True)
            if dropped:
                self._count("dropped_buffer_full", dropped)

    def _lost(self, event_id: str, why: str) -> None:
        self._count("lost", 1)
        log.error("impression %s lost: %s", event_id, why)

    def _log_dropped(self) -> None:
        with self._lock:
            ids, self._dropped_ids = self._dropped_ids, []
        if ids:
            _log_ids(logging.WARNING, f"impressions dropped, buffer full ({self.buffer_size})", ids)

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n
        metrics.IMPRESSIONS.labels(outcome).inc(n)


class _Done:
    """A finished future's shape, for records that close() counts as unsent."""

    is_done = True
    exception = None


def _log_ids(level: int, what: str, ids: list[str]) -> None:
    for start in range(0, len(ids), LOGGED_IDS):
        chunk = ids[start : start + LOGGED_IDS]
        log.log(level, "%d %s (%d-%d of %d): %s", len(chunk), what, start + 1, start + len(chunk), len(ids),
                " ".join(chunk))  # fmt: skip


def kafka_producer(settings: Settings, *, delivery_timeout_ms: int | None = None) -> Any:
    """The impression producer: batched per drain, bounded waits so the logger notices an outage quickly.

    Not idempotent: kafka-python 3.0's idempotent producer (its default) stops sending for good once a
    batch has expired (an outage longer than the delivery timeout); without it, it sends again as soon as
    the broker is back. One request in flight per connection keeps the retries in order.
    """
    delivery_ms = delivery_timeout_ms or settings.impression_delivery_timeout_ms
    return kafka_clients.producer(
        settings,
        acks="all",
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        linger_ms=50,  # batches of a 100 ms drain go out in one request per partition
        # ... in one batch per partition: the default 16 KiB holds a few dozen impressions, so a larger drain
        # (or up to BATCH records after a backlog) would open more batches and wake the network thread more
        # (`python -m bench.impressions` compares)
        batch_size=256 * 1024,
        bootstrap_timeout_ms=3000,
        max_block_ms=2000,
        request_timeout_ms=min(5000, max(1000, delivery_ms - 100)),
        delivery_timeout_ms=delivery_ms,  # then the record goes back into the logger's buffer
    )
