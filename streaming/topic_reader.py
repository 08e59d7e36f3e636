"""Bounded reads of the event log: every event on a topic up to its end offsets at the time of the call."""

from __future__ import annotations

from collections.abc import Iterator

from kafka import TopicPartition

from adloop.settings import Settings
from streaming import kafka_clients
from streaming.events import Event, InvalidEvent, parse_event


def read_events(settings: Settings, topic: str | None = None, *, poll_ms: int = 1000) -> Iterator[Event]:
    """Valid events of `topic` (default: the events topic) from the beginning to its current end.

    Invalid messages are skipped here: the feature consumer dead-letters them.
    """
    topic = topic or settings.events_topic
    consumer = kafka_clients.consumer(settings, max_poll_records=5000)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        remaining = {tp: end for tp, end in consumer.end_offsets(partitions).items() if end > 0}
        while remaining:
            for tp, records in consumer.poll(timeout_ms=poll_ms).items():
                for record in records:
                    if record.offset >= remaining.get(tp, 0):
                        continue
                    event = _parse_or_none(record.value, settings.max_event_bytes)
                    if event is not None:
                        yield event
                if records and records[-1].offset >= remaining.get(tp, 0) - 1:
                    remaining.pop(tp, None)
    finally:
        consumer.close()


def _parse_or_none(raw: bytes, max_bytes: int) -> Event | None:
    try:
        return parse_event(raw, max_bytes=max_bytes)
    except InvalidEvent:
        return None
