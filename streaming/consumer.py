"""The feature consumer: Kafka micro-batches -> user and ad features in Feast (Redis online, parquet offline).

One batch, in order (poll -> decode -> handle -> sink -> store offsets after the write):
  1. decode each message; a bad one goes to the dead-letter topic with its reason, a repeated
     event id is counted and skipped, a message at or below the partition's applied offset
     (already applied before a crash or rebalance) is skipped;
  2. fold the events into the users' states (streaming.aggregates, pure);
  3. append the batch's rows to the offline store (one parquet file per view and batch, read by
     Feast): one row per user and ad touched, stamped with its latest event time (the rows
     serving reads online after this batch), plus a user's state just before each ad impression
     (what the ranker saw), so point-in-time training rows do not depend on batch sizes;
  4. one atomic Redis write: states, seen ids, ad counters, the latest online rows in Feast's
     own layout (features/online.py) and each partition's applied offset;
  5. commit the Kafka offsets.
Steps 1-2 run on the main thread, 3-4 on a writer thread, 5 on the main thread once the write is
known to have applied; batch N+1 does steps 1-2 (on N's states, seen ids and offsets, kept in memory)
while N does 3-4. At most one batch is in flight (`FeatureConsumer`).
A crash anywhere replays from the last applied offset: nothing counts twice, nothing is lost.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from adloop.settings import Settings
from features.online import FeastLayout, write_rows
from features.sink import FeastSink
from features.store import AD_VIEW, USER_VIEW
from streaming import metrics
from streaming.aggregates import (
    UserState,
    ad_bucket_keys,
    ad_features,
    apply_user,
    prune,
    stale_ad_counters,
    user_features,
)
from streaming.dead_letters import DeadLetters
from streaming.events import Event, EventType, InvalidEvent, parse_event
from streaming.state_store import StateStore

log = logging.getLogger(__name__)
GROUP = "adloop-features"


@dataclass
class BatchReport:
    applied: int = 0
    duplicates: int = 0
    replayed: int = 0  # at or below an applied offset: skipped
    dead_lettered: dict[str, int] = field(default_factory=dict)

    @property
    def handled(self) -> int:
        """Messages accounted for, whatever their fate."""
        return self.applied + self.duplicates + self.replayed + sum(self.dead_lettered.values())


@dataclass
class _Folded:
    """A batch decoded and folded by the main thread, with everything its write needs. `states` are the live
    objects the next batch folds on top of (the overlay); the writer thread only reads the encoded copies
    (`state_blobs`) and the rows, which nothing mutates."""

    batch: dict[TopicPartition, list[Any]]
    report: BatchReport
    started: float
    states: dict[str, UserState]
    state_blobs: dict[str, bytes]
    seen_ids: list[str]
    user_rows: list[tuple[str, int, dict[str, Any]]]  # the online rows, one per user
    snapshots: list[tuple[str, int, dict[str, Any]]]  # offline only: a user's row before an ad impression
    ad_increments: dict[str, dict[str, int]]
    ad_last: dict[str, int]
    offsets: dict[int, int]  # partition -> last offset of the batch
    name: str
    stale: dict[str, list[str]] = field(default_factory=dict)  # counters found stale by `refresh_ads`
    seen: set[str] = field(default_factory=set)
    future: Future | None = None


class FeatureConsumer:
    """Owns one kafka-python consumer in the group; `run()` until stopped or idle.

    `run()` overlaps two batches: while a writer thread writes batch N (offline parquet, then the one
    MULTI/EXEC with its offsets), the main thread polls and folds batch N+1 on top of N's states, seen ids
    and applied offsets kept in memory (N's write may not have landed yet). At most one batch is in
    flight: N+1 is handed to the writer only after N's write succeeded and its Kafka offsets were
    committed. A failed write raises in the main loop, which stops (N and N+1 uncommitted: a restart
    replays them from the offsets stored in Redis). A revoke, `close()` and idle polls wait for the write.

    The overlap raises throughput a little and lengthens each batch's own fold and write (both threads share
    the GIL): at a rate the consumer keeps up with, it made features later (bench.ingest (c): p50 +40-66%).
    So a batch is overlapped only when the poll returned a full batch (the consumer is behind); a partial
    batch is written before the next poll (`overlap_only_when_behind`; BENCHMARKS.md, Ingest, Session 4).
    """

    overlap_only_when_behind = True

    def __init__(self, settings: Settings, *, redis_client: Any, group: str = GROUP, topic: str | None = None):
        self.settings = settings
        self.topic = topic or settings.events_topic
        self.state = StateStore(redis_client, group=group, topic=self.topic)
        self.sink = FeastSink(settings)
        self.dead_letters = DeadLetters(_producer(settings), settings.dlq_topic)
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.consumer_batch_size,
            bootstrap_timeout_ms=5000,
            session_timeout_ms=10_000,  # a crashed member's partitions move on after 10 s, not 45
            heartbeat_interval_ms=3_000,
        )
        self.applied = self.state.applied_offsets()
        self.layout = FeastLayout.from_settings(settings)
        self.touched_ads: set[str] = set()
        self.total = BatchReport()  # everything `run` has written so far
        self.stale_counters: dict[str, list[str]] = {}  # ad -> counter fields outside every window
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adloop-writer")
        self._pending: _Folded | None = None  # handed to the writer, not yet collected
        self._lock = threading.Lock()  # the main thread and the revoke listener (kafka-python's IO thread)
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))

    def run(self, *, stop: Callable[[], bool] = lambda: False, idle_exit_s: float | None = None) -> BatchReport:
        """Poll and apply batches until `stop()` or until nothing arrived for `idle_exit_s` seconds."""
        total = self.total
        # Objects made so far (Feast, pandas, kafka-python...) outlive the run: frozen, the full
        # collections that polling still sets off skip them (0.37 -> 0.01 s over bench (b)'s run).
        # Unfrozen at the end, so that they are collected as usual afterwards (and at exit).
        gc.freeze()
        idle_since = time.monotonic()
        try:
            while not stop():
                if self._pending is not None and self._pending.future.done():
                    self._collect()
                # With a write in flight, take what is already fetched; nothing there: wait for the write.
                wait_ms = 0 if self._pending is not None else self.settings.consumer_batch_ms
                batch = self.consumer.poll(timeout_ms=wait_ms, max_records=self.settings.consumer_batch_size)
                if not batch:
                    if self._pending is not None:
                        self._collect()
                        continue
                    self.refresh_ads()
                    if not self.consumer.assignment():
                        idle_since = time.monotonic()  # still joining the group: not idle yet
                    elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                idle_since = time.monotonic()
                self._hand_over(self._fold_gc_paused(batch))
                if self.overlap_only_when_behind and sum(map(len, batch.values())) < self.settings.consumer_batch_size:
                    self._collect()  # keeping up: a batch's latency matters more than the overlap's throughput
        finally:
            gc.unfreeze()
            self.close()
        return total

    def apply(self, batch: dict[TopicPartition, list[Any]]) -> BatchReport:
        """Apply one polled batch end to end (folded, written, committed) and return what it did."""
        folded = self._fold_gc_paused(batch)
        self._hand_over(folded)
        self._collect()
        return folded.report

    def batch_written(self, batch: dict[TopicPartition, list[Any]], report: BatchReport, written_at: float) -> None:
        """Called once a batch's transaction applied (`written_at`: `time.time()` right after its EXEC) and
        its Kafka offsets were committed; a hook for measurements."""

    def _fold_gc_paused(self, batch: dict[TopicPartition, list[Any]]) -> _Folded:
        """`_fold`, with the collector paused from now until the batch is collected (`_collect`) or dropped."""
        _GC_PAUSE.hold()
        try:
            return self._fold(batch)
        except BaseException:
            _GC_PAUSE.release()
            raise

    def _fold(self, batch: dict[TopicPartition, list[Any]]) -> _Folded:
        """Decode, drop duplicates and replays, fold into the users' states (on top of the batch in flight)."""
        started = time.perf_counter()
        report = BatchReport()
        events: list[tuple[TopicPartition, int, Event]] = []
        last_offsets: dict[int, int] = {}
        for tp, records in batch.items():
            applied = self.applied.get(tp.partition, -1)
            for record in records:
                last_offsets[tp.partition] = record.offset
                if record.offset <= applied:
                    report.replayed += 1
                    continue
                try:
                    event = parse_event(record.value, max_bytes=self.settings.max_event_bytes)
                    self._check_time(event)
                except InvalidEvent as error:
                    self.dead_letters.send(record, error)
                    report.dead_lettered[error.reason] = report.dead_lettered.get(error.reason, 0) + 1
                    continue
                events.append((tp, record.offset, event))
        events = self._drop_duplicates(events, report)
        self.dead_letters.flush()  # dead letters are durable before their offsets are stored

        users = self._user_states({e.user_id for _, _, e in events})
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
            keys = ad_bucket_keys(event)
            if keys and event.ad_id:
                hour, fine, slot = keys
                ad_increments[event.ad_id][f"h:{hour}:{slot}"] += 1
                ad_increments[event.ad_id][f"f:{fine}:{slot}"] += 1
                ad_last[event.ad_id] = max(ad_last.get(event.ad_id, 0), event.ts_ms)
        for state in users.values():
            prune(state)
        user_rows = [(u, s.last_ts, user_features(s)) for u, s in users.items()]
        # The next batch reads these offsets, states and seen ids from memory, whether or not this write landed.
        self.applied.update(last_offsets)
        report.applied = len(events)
        seen_ids = [e.event_id for _, _, e in events]
        return _Folded(
            batch=batch,
            report=report,
            started=started,
            states=users,
            state_blobs={u: StateStore.dump_state(s) for u, s in users.items()},
            seen_ids=seen_ids,
            seen=set(seen_ids),
            user_rows=user_rows,
            snapshots=list(snapshots.values()),
            ad_increments=ad_increments,
            ad_last=ad_last,
            offsets=last_offsets,
            name=_batch_name(batch),
        )

    def _hand_over(self, folded: _Folded) -> None:
        """Wait for the batch in flight (raises its error), then hand `folded` to the writer."""
        try:
            self._collect()
        except BaseException:
            _GC_PAUSE.release()  # `folded` is dropped
            raise
        folded.stale, self.stale_counters = self.stale_counters, {}
        folded.future = self._writer.submit(self._write, folded)
        self._pending = folded

    def _write(self, folded: _Folded) -> float:
        """The writer thread: offline parquet, then one atomic Redis write (states, seen ids, ad counters, online
        rows, offsets). Ad rows are built here, after the previous batch's increments landed."""
        ad_rows, stale = self._ad_rows(folded.ad_increments, folded.ad_last)
        for ad, fields in folded.stale.items():
            stale[ad] = sorted({*fields, *stale.get(ad, ())})
        self.sink.write_offline(USER_VIEW, [*folded.snapshots, *folded.user_rows], name=folded.name)
        self.sink.write_offline(AD_VIEW, ad_rows, name=folded.name)

        def online(pipe: Any) -> None:
            write_rows(pipe, self.layout, USER_VIEW, folded.user_rows)
            write_rows(pipe, self.layout, AD_VIEW, ad_rows)
            self.state.drop_ad_counters(pipe, stale)

        self.state.commit_batch(
            states=folded.state_blobs,
            seen_ids=folded.seen_ids,
            ad_increments=folded.ad_increments,
            ad_last=folded.ad_last,
            offsets=folded.offsets,
            online=online,
        )
        return time.time()

    def _collect(self, *, from_listener: bool = False) -> None:
        """Wait for the batch in flight; once written, commit its Kafka offsets. A failed write raises here
        (the batch stays uncommitted in Kafka and in Redis) and nothing more is handed over."""
        with self._lock:
            folded, self._pending = self._pending, None
        if folded is None:
            return
        try:
            written_at = folded.future.result()  # the writer's error, if any
            self._committed(folded, written_at, from_listener=from_listener)
        finally:
            del folded  # freed before the collector may run again
            _GC_PAUSE.release()

    def _committed(self, folded: _Folded, written_at: float, *, from_listener: bool) -> None:
        self.touched_ads.update(folded.ad_last)
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o + 1, "", -1) for p, o in folded.offsets.items()}
        if from_listener:
            # kafka-python 3 calls the listener on its IO thread, where a blocking commit is refused; the
            # offsets that count are in Redis (a new owner seeks to them), Kafka's are for lag reports.
            self.consumer.commit_async(offsets)
        else:
            self.consumer.commit(offsets)
        report = folded.report
        _merge(self.total, report)
        metrics.record_batch(
            report.applied, report.duplicates, report.dead_lettered, time.perf_counter() - folded.started
        )
        self.batch_written(folded.batch, report, written_at)

    def _user_states(self, user_ids: set[str]) -> dict[str, UserState]:
        """States from Redis, overlaid with the states of the batch in flight (newer, maybe not written yet)."""
        pending = self._pending.states if self._pending is not None else {}
        if not pending:
            return self.state.user_states(user_ids)
        users = self.state.user_states([u for u in user_ids if u not in pending])
        users.update((u, pending[u]) for u in user_ids if u in pending)
        return users

    def refresh_ads(self) -> None:
        """Rewrite the online rows of ads touched since the last refresh from their counters.

        Ad counters are shared by all consumers of the group (HINCRBY commutes); a row written by
        one consumer may miss another's concurrent increment, so idle consumers rewrite theirs.
        """
        if not self.touched_ads:
            return
        rows, stale = self._ad_rows({}, dict.fromkeys(self.touched_ads, 0))
        self.stale_counters.update(stale)
        pipe = self.state.redis.pipeline(transaction=False)
        write_rows(pipe, self.layout, AD_VIEW, rows)
        pipe.execute()
        self.touched_ads.clear()

    def _ad_rows(
        self, increments: dict[str, dict[str, int]], last: dict[str, int]
    ) -> tuple[list[tuple[str, int, dict[str, Any]]], dict[str, list[str]]]:
        """Ad rows from the stored counters plus this batch's increments (not yet written), and per ad the
        counter fields outside every window."""
        rows, stale = [], {}
        for ad, (hours, fine, stored_last) in self.state.ad_counters(last).items():
            for counter, amount in increments.get(ad, {}).items():
                kind, bucket, slot = counter.split(":")
                (hours if kind == "h" else fine).setdefault(bucket, [0, 0])[int(slot)] += amount
            ts = max(stored_last, last[ad])
            rows.append((ad, ts, ad_features(hours, fine, ts)))
            stale[ad] = stale_ad_counters(hours, fine, ts)
        return rows, stale

    def close(self) -> None:
        """Wait for the batch in flight (and commit it), then close; a failed last write raises."""
        try:
            self._collect()
        finally:
            self._writer.shutdown(wait=True)
            self.consumer.close(autocommit=False)
            self.dead_letters.close()

    def _check_time(self, event: Event) -> None:
        skew_ms = self.settings.max_future_skew_s * 1000
        if event.ts_ms > time.time() * 1000 + skew_ms:
            raise InvalidEvent(
                "future_timestamp", f"ts {event.ts.isoformat()} is more than {self.settings.max_future_skew_s} s ahead"
            )

    def _drop_duplicates(self, events: list[tuple[TopicPartition, int, Event]], report: BatchReport) -> list:
        already = self.state.seen([e.event_id for _, _, e in events])
        in_flight = self._pending.seen if self._pending is not None else set()
        kept, ids = [], set()
        for item in events:
            event_id = item[2].event_id
            if event_id in already or event_id in in_flight or event_id in ids:
                report.duplicates += 1
                continue
            ids.add(event_id)
            kept.append(item)
        return kept


class _Rebalance(ConsumerRebalanceListener):
    """A revoke waits for the batch in flight, so the next owner (or this one, reassigned) starts from the
    offsets and states it wrote, and this consumer forgets its in-memory overlay."""

    def __init__(self, owner: FeatureConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))
        self.owner._collect(from_listener=True)  # a failed write raises out of `poll` (kafka-python re-raises)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.applied = self.owner.state.applied_offsets()  # another consumer may have moved them
        for tp in assigned:
            if tp.partition in self.owner.applied:
                self.owner.consumer.seek(tp, self.owner.applied[tp.partition] + 1)
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


class _GcPause:
    """The cyclic garbage collector paused while any batch is alive: from the start of its fold (main thread)
    through its write (writer thread) until it is collected and freed. A batch allocates many objects per
    event; with the collector on, they set off collections that walk every live object: full ones over the
    whole process (Feast, pandas...: 4.5 s of 17.4 s applying 110k pre-built Taobao records in batches of
    5,000, collect2), and young ones over the batches in memory (with the collector paused only while a batch
    folds, 1.7-2.3 s of a 8-9 s run of bench (b); paused until the write ended, 0.3-0.5 s). A batch's garbage
    is freed by reference counting; the collector runs when no batch is alive (between polls when idle).
    A consumer that never idles (there is always a batch alive) would never collect the few cycles a batch
    leaves (~6 objects a batch in bench (b)): every `FULL_EVERY` batches without a pause it collects once.
    Holds are counted (several consumers may share a process)."""

    FULL_EVERY = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._was_enabled = False
        self._busy_releases = 0

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._busy_releases = 0
                if self._was_enabled:
                    gc.enable()
                return
            self._busy_releases += 1
            if self._busy_releases >= self.FULL_EVERY and self._was_enabled:
                self._busy_releases = 0
                gc.collect()


_GC_PAUSE = _GcPause()


def _producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", bootstrap_timeout_ms=5000, linger_ms=5
    )


def _batch_name(batch: dict[TopicPartition, list[Any]]) -> str:
    """Deterministic per batch content, so a replay of the same batch overwrites its file."""
    return "-".join(
        f"p{tp.partition}o{records[0].offset}-{records[-1].offset}" for tp, records in sorted(batch.items())
    )


def _merge(total: BatchReport, one: BatchReport) -> None:
    total.applied += one.applied
    total.duplicates += one.duplicates
    total.replayed += one.replayed
    for reason, count in one.dead_lettered.items():
        total.dead_lettered[reason] = total.dead_lettered.get(reason, 0) + count
