"""The outcomes lander: ad events from Kafka into the `OutcomeStore`, each counted once.

A small consumer in its own group (`adloop-outcomes`): poll -> decode -> keep ad events
(`ad_impression`, `ad_click`, `conversion`) -> one `INSERT OR IGNORE` per batch (primary key
`event_id`) -> commit offsets. A crash between the insert and the commit replays the batch, and
the primary key ignores what is already there.

Nothing it cannot read vanishes: a message of the events topic that breaks the contract is landed
as a dead letter (its reason, topic, partition and offset), counted in
`adloop_outcomes_dead_lettered_total{reason}` and logged. The dead-letter topic's messages land in
the same table, keyed by the source message their headers name, so a bad event that the feature
consumer dead-lettered as well is one row, not two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from adloop.settings import Settings
from outcomes.store import OutcomeStore
from streaming import kafka_clients
from streaming.events import AD_EVENTS, Event, InvalidEvent, parse_event

GROUP = "adloop-outcomes"
DEAD_LETTERED = Counter(
    "adloop_outcomes_dead_lettered_total",
    "Messages of the events topic the outcomes lander could not read.",
    ["reason"],
)
log = logging.getLogger(__name__)


@dataclass
class LandReport:
    landed: int = 0  # ad events inserted (new)
    duplicates: int = 0  # ad events whose event_id was already there
    skipped: int = 0  # other event types
    invalid: int = 0  # messages breaking the contract: landed as dead letters with their reason
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
                    dead.append(_source_of(record))
                    report.dead_letters += 1
                    continue
                try:
                    event = parse_event(record.value, max_bytes=self.settings.max_event_bytes)
                except InvalidEvent as error:
                    report.invalid += 1
                    DEAD_LETTERED.labels(reason=error.reason).inc()
                    log.warning("unreadable event at %s/%d@%d (%s): %s, landed as a dead letter",
                                tp.topic, tp.partition, record.offset, error.reason, error.detail)  # fmt: skip
                    dead.append((tp.topic, tp.partition, record.offset, error.reason))
                    continue
                if event.event_type not in AD_EVENTS:
                    report.skipped += 1
                    continue
                events.append(event)
                report.by_type[event.event_type.value] = report.by_type.get(event.event_type.value, 0) + 1
        new = self.store.write(events, dead)
        report.landed += new
        report.duplicates += len(events) - new
        self.consumer.commit()  # the offsets of what poll returned: all of it is in the store now


def _source_of(record: Any) -> tuple[str, int, int, str]:
    """(source topic, partition, offset, reason) of a dead letter, from its headers; its own coordinates
    and reason `unknown` where the headers are missing or unreadable."""
    headers = {key: value for key, value in record.headers or []}
    try:
        source = (headers["adloop.source.topic"].decode(), int(headers["adloop.source.partition"]),
                  int(headers["adloop.source.offset"]))  # fmt: skip
    except (KeyError, ValueError, UnicodeDecodeError):
        source = (record.topic, record.partition, record.offset)
    return (*source, headers.get("adloop.reason", b"unknown").decode(errors="replace"))
