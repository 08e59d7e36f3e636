"""Producing events to Kafka: a producer built from settings, and a paced send loop with a summary.

Key = user id (UTF-8), so one user's events land on one partition, in order. Value = the
contract's compact JSON (`Event.to_bytes()`); raw `bytes` (an invalid line of a JSONL replay)
are sent unchanged so that the consumer dead-letters them with a reason instead of them
vanishing here.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adloop.settings import Settings
from streaming import kafka_clients
from streaming.events import Event

if TYPE_CHECKING:
    from kafka import KafkaProducer

log = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT_MS = 5_000  # kafka-python waits 30 s by default before saying no broker answered
PRODUCER_CONFIG: dict[str, Any] = {
    "acks": "all",  # a send counts once every in-sync replica has it
    "linger_ms": 20,  # wait up to 20 ms to fill a batch: fewer, larger requests
    "batch_size": 256 * 1024,  # bytes per partition batch (~1,000 events of ~250 B)
    "compression_type": "gzip",  # stdlib zlib; JSON compresses ~5x (lz4 would need one more package)
    "max_block_ms": 10_000,  # send() blocks at most this long on a full buffer or missing metadata
    "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
}
PROGRESS_EVERY = 1_000  # events between progress callbacks


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered at the configured address."""


def build_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A `KafkaProducer` for `adloop.events`: user-id keys, contract values, acks=all, batched and compressed."""
    from kafka.errors import KafkaTimeoutError

    config = {**PRODUCER_CONFIG, **overrides}
    try:
        return kafka_clients.producer(
            settings,
            key_serializer=_serializer(_serialize_key),
            value_serializer=_serializer(_serialize_value),
            **config,
        )
    except KafkaTimeoutError as error:
        seconds = config["bootstrap_timeout_ms"] / 1000
        raise BrokerUnavailable(
            f"no Kafka broker answered at {settings.kafka_bootstrap_servers} within {seconds:g} s "
            "(start the local stack with `adloop stack up`)"
        ) from error


@dataclass
class ProduceSummary:
    """What one `produce_events` call sent."""

    count: int = 0  # messages handed to the producer (events and raw invalid lines)
    seconds: float = 0.0  # wall time, including the final flush
    by_type: Counter[str] = field(default_factory=Counter)  # event_type -> count; raw lines under "invalid"
    failed: int = 0  # messages the broker did not acknowledge
    first_ts: str | None = None  # event time of the first and last event, RFC 3339
    last_ts: str | None = None

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def invalid(self) -> int:
        return self.by_type.get("invalid", 0)


def produce_events(
    producer: Any,
    topic: str,
    events: Iterable[Event | bytes],
    *,
    speed: float | None = None,
    max_rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    flush_timeout: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ProduceSummary:
    """Send `events` in order and return what was sent.

    `speed` N replays event time N times faster than it happened (the gap between two events of
    10 s takes 10/N s); `max_rate` caps the rate in messages per second; both may apply, the slower
    wins; neither sends as fast as the producer allows. `progress(n)` is called with the number of
    messages sent since its last call. `clock` and `sleep` are injectable for tests.
    """
    if speed is not None and speed <= 0:
        raise ValueError("speed must be positive")
    if max_rate is not None and max_rate <= 0:
        raise ValueError("max_rate must be positive")
    summary = ProduceSummary()
    failures: list[BaseException] = []
    start = clock()
    first_event_ms: int | None = None
    last_event: Event | None = None
    reported = 0
    for message in events:
        if isinstance(message, Event):
            if first_event_ms is None:
                first_event_ms, summary.first_ts = message.ts_ms, _rfc3339(message)
            last_event = message
            due = (message.ts_ms - first_event_ms) / 1000 / speed if speed else 0.0
            key, kind = message.user_id, message.event_type.value
        else:
            due, key, kind = 0.0, _key_of_raw(message), "invalid"
        if max_rate:
            due = max(due, summary.count / max_rate)
        wait = start + due - clock()
        if wait > 0:
            sleep(wait)
        future = producer.send(topic, key=key, value=message)
        future.add_errback(failures.append)
        summary.count += 1
        summary.by_type[kind] += 1
        if progress and summary.count - reported >= PROGRESS_EVERY:
            progress(summary.count - reported)
            reported = summary.count
    producer.flush(timeout=flush_timeout)
    summary.seconds = clock() - start
    summary.failed = len(failures)
    summary.last_ts = _rfc3339(last_event) if last_event else None
    if failures:
        log.error("%d of %d messages were not acknowledged; first error: %r", len(failures), summary.count, failures[0])
    if progress and summary.count > reported:
        progress(summary.count - reported)
    return summary


def _serializer(function: Callable[[Any], bytes | None]) -> Any:
    """`function` as a kafka-python 3 `Serializer` (plain callables are deprecated there)."""
    from kafka.serializer import Serializer

    class _Serializer(Serializer):
        def serialize(self, topic: str, headers: Any, data: Any) -> bytes | None:
            return function(data)

    return _Serializer()


def _serialize_key(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def _serialize_value(value: Event | bytes) -> bytes:
    return value.to_bytes() if isinstance(value, Event) else value


def _key_of_raw(raw: bytes) -> str | None:
    """The user id of an invalid message when it has a readable one (keeps it on its user's partition)."""
    try:
        user_id = json.loads(raw).get("user_id")
    except (ValueError, AttributeError):
        return None
    return user_id if isinstance(user_id, str) and user_id else None


def _rfc3339(event: Event) -> str:
    return event.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
