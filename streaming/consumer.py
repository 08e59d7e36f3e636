"""The feature consumer: Kafka micro-batches -> user and ad features in Feast (Redis online, parquet offline).

One batch, in order (poll -> decode -> handle -> sink -> store offsets after the write):
  1. decode each message; a bad one goes to the dead-letter topic with its reason, a repeated
     event id is counted and skipped, a message at or below the partition's applied offset
     (already applied before a crash or rebalance) is skipped, and so is an event of a user erased at or
     after its time (features.tombstones: still in Kafka, it would bring the erased state back);
  2. fold the events into the users' states (features.aggregates, pure);
  3. append the batch's rows to the offline store (one parquet file per view and batch, read by
     Feast): one row per user and ad touched, stamped with its latest event time (the rows
     serving reads online after this batch), plus a user's state just before each ad impression
     (what the ranker saw), so point-in-time training rows do not depend on batch sizes;
  4. one atomic Redis write: states, seen ids, ad counters, the latest online rows in Feast's
     own layout (features/online.py) and each partition's applied offset;
  5. commit the Kafka offsets.
A crash anywhere replays from the last applied offset: nothing counts twice, nothing is lost.
A batch whose dead letters the broker did not acknowledge, whose write another consumer fenced off
(streaming.state_store) or that met Redis down or restarting is not committed: the consumer reads
it again from where the stored offsets say (`_retry`). Stored offsets beyond the topic's end (a
recreated topic) stop it with `OffsetsAheadOfTopic` instead of skipping every new record as replayed.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from kafka import OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from adloop.settings import Settings
from features import tombstones
from features.aggregates import (
    ad_counter_fields,
    ad_features,
    add_counter,
    apply_user,
    prune,
    stale_ad_counters,
    user_features,
)
from features.online import FeastLayout, write_rows
from features.sink import FeastSink
from features.store import AD_VIEW, USER_VIEW
from streaming import dead_letters, kafka_clients, metrics
from streaming.dead_letters import DeadLetters, DeadLetterUndelivered
from streaming.events import DecodedEvent, EventType, InvalidEvent, decode_event
from streaming.state_store import StaleWrite, StateStore

log = logging.getLogger(__name__)
GROUP = "adloop-features"
RETRY_PAUSE_S = 1.0  # after a batch that could not commit, before reading it again


class OffsetsAheadOfTopic(RuntimeError):
    """Applied offsets stored in Redis lie beyond the topic's end: the topic was recreated (or emptied)."""


@dataclass
class BatchReport:
    applied: int = 0
    duplicates: int = 0
    replayed: int = 0  # at or below an applied offset: skipped
    erased: int = 0  # of a user erased at or after the event's time (features.tombstones): skipped
    dead_lettered: dict[str, int] = field(default_factory=dict)

    @property
    def handled(self) -> int:
        """Messages accounted for, whatever their fate."""
        return self.applied + self.duplicates + self.replayed + self.erased + sum(self.dead_lettered.values())


class FeatureConsumer:
    """Owns one kafka-python consumer in the group; `run()` until stopped or idle."""

    def __init__(self, settings: Settings, *, redis_client: Any, group: str = GROUP, topic: str | None = None):
        self.settings = settings
        self.topic = topic or settings.events_topic
        self.state = StateStore(redis_client, group=group, topic=self.topic)
        self.sink = FeastSink(settings)
        dlq_producer = kafka_clients.producer(settings, **dead_letters.PRODUCER_CONFIG)
        self.dead_letters = DeadLetters(dlq_producer, settings.dlq_topic)
        self.consumer = kafka_clients.consumer(
            settings,
            group_id=group,
            auto_offset_reset="earliest",
            max_poll_records=settings.consumer_batch_size,
            session_timeout_ms=10_000,  # a crashed member's partitions move on after 10 s, not 45
            heartbeat_interval_ms=3_000,
        )
        self.applied = self.state.applied_offsets()
        self.layout = FeastLayout.from_settings(settings)
        self.touched_ads: set[str] = set()
        self.total = BatchReport()  # everything `run` has done so far
        self.stale_counters: dict[str, list[str]] = {}  # ad -> counter fields outside every window
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))

    def run(self, *, stop: Callable[[], bool] = lambda: False, idle_exit_s: float | None = None) -> BatchReport:
        """Poll and apply batches until `stop()` or until nothing arrived for `idle_exit_s` seconds."""
        total = self.total
        # Objects made so far (Feast, pandas, kafka-python...) outlive the run: frozen, the full
        # collections that polling still sets off skip them.
        # Unfrozen at the end, so that they are collected as usual afterwards (and at exit).
        gc.freeze()
        idle_since = time.monotonic()
        try:
            while not stop():
                batch = self.consumer.poll(
                    timeout_ms=self.settings.consumer_batch_ms, max_records=self.settings.consumer_batch_size
                )
                if not batch:
                    self.refresh_ads()
                    if not self.consumer.assignment():
                        idle_since = time.monotonic()  # still joining the group: not idle yet
                    elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                idle_since = time.monotonic()
                try:
                    _merge(total, self.apply(batch))
                except (DeadLetterUndelivered, StaleWrite, redis.ConnectionError, redis.TimeoutError) as error:
                    self._retry(batch, error, stop)
        finally:
            gc.unfreeze()
            self.close()
        return total

    def apply(self, batch: dict[TopicPartition, list[Any]]) -> BatchReport:
        """Apply one polled batch end to end; returns what it did.

        The cyclic garbage collector is paused meanwhile: a batch allocates many objects per event,
        which set off full collections over every object of the process (Feast, pandas...): 4.5 s
        of 17.4 s when applying 110k pre-built Taobao records in batches of 5,000. The batch's
        garbage is freed by reference counting; the collector runs again between batches.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._apply(batch)
        finally:
            if collecting:
                gc.enable()

    def _apply(self, batch: dict[TopicPartition, list[Any]]) -> BatchReport:
        started = time.perf_counter()
        report = BatchReport()
        events: list[tuple[TopicPartition, int, DecodedEvent]] = []
        last_offsets: dict[int, int] = {}
        for tp, records in batch.items():
            applied = self.applied.get(tp.partition, -1)
            if records[0].offset <= applied:
                self._check_ahead(tp, applied)
            for record in records:
                last_offsets[tp.partition] = record.offset
                if record.offset <= applied:
                    report.replayed += 1
                    continue
                try:
                    event = decode_event(record.value, max_bytes=self.settings.max_event_bytes)
                    self._check_time(event)
                except InvalidEvent as error:
                    self.dead_letters.send(record, error)
                    report.dead_lettered[error.reason] = report.dead_lettered.get(error.reason, 0) + 1
                    continue
                events.append((tp, record.offset, event))
        events = self._drop_duplicates(events, report)
        events = self._drop_erased(events, report)
        self.dead_letters.flush()  # dead letters are durable before their offsets are stored

        users = self.state.user_states({e.user_id for _, _, e in events})
        ad_increments: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        ad_last: dict[str, int] = {}
        snapshots: dict[tuple[str, int], tuple[str, int, dict[str, Any]]] = {}
        for _, _, event in events:
            state = users[event.user_id]
            seen_until = (event.user_id, state.last_ts)
            if (
                event.event_type == EventType.ad_impression
                and 0 < state.last_ts < event.ts_ms
                and seen_until not in snapshots
            ):
                # What the ranker saw for this impression: a training row exact whatever the batch size.
                snapshots[seen_until] = (event.user_id, state.last_ts, user_features(state))
            apply_user(state, event)
            counters = ad_counter_fields(event)
            if counters and event.ad_id:
                for counter in counters:
                    ad_increments[event.ad_id][counter] += 1
                ad_last[event.ad_id] = max(ad_last.get(event.ad_id, 0), event.ts_ms)
        for state in users.values():
            prune(state)
        user_rows = [(u, s.last_ts, user_features(s)) for u, s in users.items()]
        ad_rows = self._ad_rows(ad_increments, ad_last)
        name = _batch_name(batch)
        self.sink.write_offline(USER_VIEW, [*snapshots.values(), *user_rows], name=name)
        self.sink.write_offline(AD_VIEW, ad_rows, name=name)

        def online(pipe: Any) -> None:
            write_rows(pipe, self.layout, USER_VIEW, user_rows)
            write_rows(pipe, self.layout, AD_VIEW, ad_rows)
            self.state.drop_ad_counters(pipe, self.stale_counters)
            self.stale_counters.clear()

        self.state.commit_batch(
            states=users,
            seen_ids=[e.event_id for _, _, e in events],
            ad_increments=ad_increments,
            ad_last=ad_last,
            offsets=last_offsets,
            expected={p: self.applied.get(p) for p in last_offsets},
            online=online,
        )
        for partition, offset in last_offsets.items():
            self.applied[partition] = max(offset, self.applied.get(partition, -1))
        self.touched_ads.update(ad_last)
        try:
            self.consumer.commit(
                {TopicPartition(self.topic, p): OffsetAndMetadata(o + 1, "", -1) for p, o in last_offsets.items()}
            )
        except KafkaError as error:  # the group moved on, or the broker is away: Redis holds the offsets that count
            log.warning("Kafka offset commit failed after the batch was stored (%s); the stored offsets hold", error)

        report.applied = len(events)
        metrics.record_batch(report.applied, report.duplicates, report.dead_lettered, time.perf_counter() - started)
        return report

    def refresh_ads(self) -> None:
        """Rewrite the online rows of ads touched since the last refresh from their counters.

        Ad counters are shared by all consumers of the group (HINCRBY commutes); a row written by
        one consumer may miss another's concurrent increment, so idle consumers rewrite theirs.
        """
        if not self.touched_ads:
            return
        rows = self._ad_rows({}, dict.fromkeys(self.touched_ads, 0))
        pipe = self.state.redis.pipeline(transaction=False)
        write_rows(pipe, self.layout, AD_VIEW, rows)
        pipe.execute()
        self.touched_ads.clear()

    def _ad_rows(
        self, increments: dict[str, dict[str, int]], last: dict[str, int]
    ) -> list[tuple[str, int, dict[str, Any]]]:
        """Ad rows from the stored counters plus this batch's increments (not yet written)."""
        rows = []
        for ad, (hours, fine, stored_last) in self.state.ad_counters(last).items():
            for counter, amount in increments.get(ad, {}).items():
                add_counter(hours, fine, counter, amount)
            ts = max(stored_last, last[ad])
            rows.append((ad, ts, ad_features(hours, fine, ts)))
            self.stale_counters[ad] = stale_ad_counters(hours, fine, ts)
        return rows

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.dead_letters.close()

    def _retry(self, batch: dict[TopicPartition, list[Any]], error: Exception, stop: Callable[[], bool]) -> None:
        """A batch that stored nothing (or whose outcome is unknown): read its partitions again from the
        offsets stored in Redis, once Redis answers."""
        log.warning("batch not committed, read again from the stored offsets: %s", error)
        while True:
            time.sleep(RETRY_PAUSE_S)
            try:
                self.applied = self.state.applied_offsets()
                break
            except (redis.ConnectionError, redis.TimeoutError) as down:
                log.warning("Redis unavailable (%s), retrying in %.1f s", down, RETRY_PAUSE_S)
                if stop():
                    return
        owned = self.consumer.assignment()
        for tp, records in batch.items():
            if tp in owned:  # a partition moved away is sought by the rebalance listener of its new owner
                stored = self.applied.get(tp.partition)
                self.consumer.seek(tp, records[0].offset if stored is None else stored + 1)

    def _check_ahead(self, tp: TopicPartition, applied: int) -> None:
        """Records at or below the applied offset are a replay after a crash, unless the topic is shorter."""
        end = self.consumer.end_offsets([tp])[tp]
        if applied >= end:
            raise OffsetsAheadOfTopic(
                f"the applied offset stored for {tp.topic} partition {tp.partition} is {applied}, but the topic "
                f"ends at {end}: was the topic recreated? Its new records would be skipped as already applied. "
                "If so, `adloop consume --reset-offsets` forgets the stored offsets (features and seen event ids "
                "are kept, so events seen before still count once)."
            )

    def _check_time(self, event: DecodedEvent) -> None:
        skew_ms = self.settings.max_future_skew_s * 1000
        if event.ts_ms > time.time() * 1000 + skew_ms:
            raise InvalidEvent(
                "future_timestamp", f"ts {event.ts.isoformat()} is more than {self.settings.max_future_skew_s} s ahead"
            )

    def _drop_erased(self, events: list[tuple[TopicPartition, int, DecodedEvent]], report: BatchReport) -> list:
        """Events still in Kafka of a user erased since (`adloop users forget`) would bring their state back:
        skipped, counted. An event after the erasure is new activity and counts."""
        erased = tombstones.erased_among(self.state.redis, sorted({e.user_id for _, _, e in events}))
        if not erased:
            return events
        kept = [item for item in events if item[2].ts_ms > erased.get(item[2].user_id, -1)]
        report.erased += len(events) - len(kept)
        metrics.ERASED.inc(len(events) - len(kept))
        return kept

    def _drop_duplicates(self, events: list[tuple[TopicPartition, int, DecodedEvent]], report: BatchReport) -> list:
        already = self.state.seen([e.event_id for _, _, e in events])
        kept, ids = [], set()
        for item in events:
            event_id = item[2].event_id
            if event_id in already or event_id in ids:
                report.duplicates += 1
                continue
            ids.add(event_id)
            kept.append(item)
        return kept


class _Rebalance(ConsumerRebalanceListener):
    """Batches are applied and committed inside `poll`'s caller, so a revoke finds nothing in flight."""

    def __init__(self, owner: FeatureConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.applied = self.owner.state.applied_offsets()  # another consumer may have moved them
        for tp in assigned:
            if tp.partition in self.owner.applied:
                self.owner.consumer.seek(tp, self.owner.applied[tp.partition] + 1)
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


def _batch_name(batch: dict[TopicPartition, list[Any]]) -> str:
    """Deterministic per batch content, so a replay of the same batch overwrites its file."""
    return "-".join(
        f"p{tp.partition}o{records[0].offset}-{records[-1].offset}" for tp, records in sorted(batch.items())
    )


def _merge(total: BatchReport, one: BatchReport) -> None:
    total.applied += one.applied
    total.duplicates += one.duplicates
    total.erased += one.erased
    total.replayed += one.replayed
    for reason, count in one.dead_lettered.items():
        total.dead_lettered[reason] = total.dead_lettered.get(reason, 0) + count
