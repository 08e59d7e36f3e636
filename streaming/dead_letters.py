"""Dead letters: a message that breaks the contract goes to the DLQ topic unchanged, with why and where from.

The DLQ message keeps the original key and value bytes; headers carry the reason code, a
human-readable detail naming the field, and the source topic, partition and offset.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaProducer

from streaming.events import InvalidEvent

DETAIL_LIMIT = 1000  # characters of the detail header


class DeadLetters:
    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def send(self, record: Any, error: InvalidEvent) -> None:
        """Queue one bad record (a kafka-python ConsumerRecord); `flush()` makes it durable."""
        headers = [
            ("adloop.reason", error.reason.encode()),
            ("adloop.detail", error.detail[:DETAIL_LIMIT].encode()),
            ("adloop.source.topic", record.topic.encode()),
            ("adloop.source.partition", str(record.partition).encode()),
            ("adloop.source.offset", str(record.offset).encode()),
        ]
        self.producer.send(self.topic, key=record.key, value=record.value, headers=headers)

    def flush(self) -> None:
        self.producer.flush(timeout=30)

    def close(self) -> None:
        self.producer.close(timeout=10)


def describe(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    """The adloop.* headers of a dead letter as text, e.g. {'reason': 'schema', 'source.offset': '12'}."""
    return {k.removeprefix("adloop."): v.decode() for k, v in headers if k.startswith("adloop.")}
