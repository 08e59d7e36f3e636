"""Dead letters: a message that breaks the contract goes to the DLQ topic unchanged, with why and where from.

The DLQ message keeps the original key and value bytes; headers carry the reason code, a
human-readable detail naming the field, and the source topic, partition and offset.

A dead letter is part of its batch: `flush()` waits (bounded) until the broker has acknowledged
every one queued since the last flush, re-sends those that failed, and raises `DeadLetterUndelivered`
if some still fail, so the consumer does not store the batch's offsets and applies it again later.
A re-sent dead letter may reach the topic twice; its source coordinates (headers) identify it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import Counter

from streaming.events import InvalidEvent

DETAIL_LIMIT = 1000  # characters of the detail header
FLUSH_TIMEOUT_S = 10.0  # one flush waits at most this long for the broker's acknowledgements
SEND_ATTEMPTS = 3  # sends of one dead letter within one flush before the batch gives up
UNDELIVERED = Counter(
    "adloop_consumer_dead_letter_failures_total",
    "Dead-letter sends the broker did not acknowledge (each is re-sent; the batch commits only once all are in).",
)
log = logging.getLogger(__name__)

# kafka-python 3's producer is idempotent by default, and once one of its batches expires it never
# sends again (a broker outage longer than delivery_timeout_ms stops it for good). Without
# idempotence, one request in flight keeps retries in order, and it recovers as soon as the
# broker is back.
PRODUCER_CONFIG: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": False,
    "max_in_flight_requests_per_connection": 1,
    "linger_ms": 5,
    "delivery_timeout_ms": int(FLUSH_TIMEOUT_S * 1000),
    "request_timeout_ms": int(FLUSH_TIMEOUT_S * 1000) - 1000,
    "max_block_ms": 5000,  # send() waits this long for a missing topic's metadata (default 60 s)
}


class DeadLetterUndelivered(RuntimeError):
    """Some dead letters of the batch were not acknowledged: its offsets must not be stored."""


@dataclass
class _Pending:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    future: Any


class DeadLetters:
    def __init__(self, producer: KafkaProducer, topic: str, *, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        self.producer = producer
        self.topic = topic
        self.timeout_s = timeout_s
        self.pending: list[_Pending] = []

    def send(self, record: Any, error: InvalidEvent) -> None:
        """Queue one bad record (a kafka-python ConsumerRecord); `flush()` makes it durable."""
        headers = [
            ("adloop.reason", error.reason.encode()),
            ("adloop.detail", error.detail[:DETAIL_LIMIT].encode()),
            ("adloop.source.topic", record.topic.encode()),
            ("adloop.source.partition", str(record.partition).encode()),
            ("adloop.source.offset", str(record.offset).encode()),
        ]
        self.pending.append(_Pending(record.key, record.value, headers, self._send(record.key, record.value, headers)))

    def flush(self) -> None:
        """Wait until every queued dead letter is acknowledged (re-sending failures, `SEND_ATTEMPTS` in all).

        Raises `DeadLetterUndelivered` when some are still not acknowledged; they are dropped from
        the queue then, since the caller applies the whole batch again (and queues them again).
        """
        for attempt in range(1, SEND_ATTEMPTS + 1):
            failed = self._wait()
            if not failed:
                self.pending.clear()
                return
            UNDELIVERED.inc(len(failed))
            where = ", ".join(_source(p.headers) for p in failed[:5])
            log.warning("%d dead letter(s) not acknowledged (attempt %d of %d; %s%s): %r", len(failed), attempt,
                        SEND_ATTEMPTS, where, ", ..." if len(failed) > 5 else "", _error(failed[0]))  # fmt: skip
            if attempt < SEND_ATTEMPTS:
                for item in failed:
                    item.future = self._send(item.key, item.value, item.headers)
                self.pending = failed
        self.pending.clear()
        raise DeadLetterUndelivered(
            f"{len(failed)} dead letter(s) to {self.topic} not acknowledged after {SEND_ATTEMPTS} attempts; "
            "the batch's offsets are not stored"
        )

    def close(self) -> None:
        self.producer.close(timeout=10)

    def _send(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        try:
            return self.producer.send(self.topic, key=key, value=value, headers=headers)
        except KafkaError as error:  # e.g. metadata not available within max_block_ms
            return _Failed(error)

    def _wait(self) -> list[_Pending]:
        """The queued dead letters not acknowledged within the timeout."""
        with contextlib.suppress(KafkaError):  # what is not done yet counts as failed below
            self.producer.flush(timeout=self.timeout_s)
        return [p for p in self.pending if not (p.future.is_done and p.future.succeeded())]


class _Failed:
    """The outcome of a send that raised at once, shaped like a failed kafka-python future."""

    is_done = True

    def __init__(self, error: Exception) -> None:
        self.exception = error

    def succeeded(self) -> bool:
        return False


def _source(headers: list[tuple[str, bytes]]) -> str:
    meta = describe(headers)
    return f"{meta['source.topic']}/{meta['source.partition']}@{meta['source.offset']}"


def _error(item: _Pending) -> BaseException | str:
    return getattr(item.future, "exception", None) or "not acknowledged in time"


def describe(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    """The adloop.* headers of a dead letter as text, e.g. {'reason': 'schema', 'source.offset': '12'}."""
    return {k.removeprefix("adloop."): v.decode() for k, v in headers if k.startswith("adloop.")}
