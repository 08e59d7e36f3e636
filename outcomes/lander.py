"""The outcomes lander: ad events from Kafka into the `OutcomeStore`, each counted once.

A small consumer in its own group (`adloop-outcomes`): poll -> decode -> keep ad events
(`ad_impression`, `ad_click`, `conversion`) -> one `INSERT OR IGNORE` per batch (primary key
`event_id`) -> commit offsets. A crash between the insert and the commit replays the batch, and
the primary key ignores what is already there. Messages that break the contract are skipped here
(the feature consumer dead-letters them); the lander lands the dead-letter topic's messages in
their own table (key: partition and offset), with their reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adloop.settings import Settings
from outcomes.store import OutcomeStore
from streaming import kafka_clients
from streaming.events import AD_EVENTS, Event, InvalidEvent, parse_event

GROUP = "adloop-outcomes"


@dataclass
class LandReport:
    landed: int = 0  # ad events inserted (new)
    duplicates: int = 0  # ad events whose event_id was already there
    skipped: int = 0  # other event types
    invalid: int = 0  # messages breaking the contract (the feature consumer dead-letters them)
    dead_letters: int = 0  # messages of the dead-letter topic landed
    by_type: dict[str, int] = field(default_factory=dict)


class OutcomeLander:
    """Consumes `adloop.events` (and its dead-letter topic) into an `OutcomeStore`; `run()` until stopped."""

    def __init__(self, settings: Settings, store: OutcomeStore, *, group: str = GROUP, topic: str | None = None):
        self.settings = settings
        self.store = store
        self.topic = topic or settings.events_topic
        self.dlq_topic = settings.dlq_topic
        store.setup()
        self.consumer = kafka_clients.consumer(
            settings,
            self.topic,
            self.dlq_topic,
            group_id=group,
            auto_offset_reset="earliest",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
            metadata_max_age_ms=5_000,  # notice a dead-letter topic created after start
        )

    def run(self, *, stop: Callable[[], bool] = lambda: False, idle_exit_s: float | None = None) -> LandReport:
        """Poll, land, commit; until `stop()` or nothing arrived for `idle_exit_s` seconds."""
        total = LandReport()
        idle_since = time.monotonic()
        try:
            while not stop():
                batch = self.consumer.poll(timeout_ms=200, max_records=5000)
                if not batch:
                    if not self.consumer.assignment():
                        idle_since = time.monotonic()
                    elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                idle_since = time.monotonic()
                self.land(batch, total)
        finally:
            self.consumer.close(autocommit=False)
        return total

    def land(self, batch: dict[Any, list[Any]], report: LandReport) -> None:
        """One batch: insert (idempotent), then commit the offsets."""
        events: list[Event] = []
        dead: list[tuple[str, int, int, str]] = []
        for tp, records in batch.items():
            for record in records:
                if tp.topic == self.dlq_topic:
                    dead.append((tp.topic, tp.partition, record.offset, _reason(record.headers)))
                    continue
                try:
                    event = parse_event(record.value, max_bytes=self.settings.max_event_bytes)
                except InvalidEvent:
                    report.invalid += 1
                    continue
                if event.event_type not in AD_EVENTS:
                    report.skipped += 1
                    continue
                events.append(event)
                report.by_type[event.event_type.value] = report.by_type.get(event.event_type.value, 0) + 1
        new = self.store.write(events, dead)
        report.landed += new
        report.duplicates += len(events) - new
        report.dead_letters += len(dead)
        self.consumer.commit()  # the offsets of what poll returned: all of it is in the store now


def _reason(headers: list[tuple[str, bytes]] | None) -> str:
    for key, value in headers or []:
        if key == "adloop.reason":
            return value.decode(errors="replace")
    return "unknown"
