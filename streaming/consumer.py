"""The feature consumer: Kafka micro-batches -> user and ad features in Feast (Redis online, parquet offline).

One batch, in order (poll -> decode -> handle -> sink -> store offsets after the write):
  1. decode each message; a bad one goes to the dead-letter topic with its reason, a message at or
     below the partition's applied offset (already applied before a crash or rebalance) is skipped,
     and so is an event of a user erased at or after its time (features.tombstones: still in Kafka,
     it would bring the erased state back);
  2. fold the events into the users' states (features.aggregates, pure); an event id the user's
     state remembers is a repeat, counted and skipped (`repeat_of`);
  3. append the batch's rows to the offline store (one parquet file per view and batch, read by
     Feast): one row per user and ad touched, stamped with its latest event time (the rows
     serving reads online after this batch), plus a user's state just before each ad impression
     (what the ranker saw), so point-in-time training rows do not depend on batch sizes;
  4. per partition, one atomic fenced Redis write under the partition's hash tag (streaming.state_store):
     its users' states, its ad counters and its applied offset, one slot on Redis Cluster;
  5. the online rows in Feast's own layout (features/online.py), each only over an older row: a crash
     between 4 and 5 is mended by the partition's next owner, which rewrites the rows of its last batch;
  6. commit the Kafka offsets.
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
    RECENT_IDS_N,
    ad_counter_fields,
    ad_features,
    add_counter,
    apply_user,
    prune,
    remember,
    repeat_of,
    session_before,
    stale_ad_counters,
    user_features,
)
from features.article_flow import (
    ARTICLE,
    NEXT,
    Counters,
    article_row,
    click_counters,
    decay_fields,
    followers,
    merge_field,
    pair_id,
    stale_article_fields,
    stale_transition_fields,
    transition_fields,
    transition_row,
)
from features.online import FeastLayout, write_rows
from features.sink import FeastSink
from features.store import AD_VIEW, ARTICLE_VIEW, TRANSITION_VIEW, USER_VIEW
from streaming import dead_letters, kafka_clients, metrics
from streaming.dead_letters import DeadLetters, DeadLetterUndelivered
from streaming.events import DecodedEvent, EventType, InvalidEvent, decode_event
from streaming.state_store import PartitionBatch, StaleWrite, StateStore

log = logging.getLogger(__name__)
GROUP = "adloop-features"
RETRY_PAUSE_S = 1.0  # after a batch that could not commit, before reading it again
# A rebalance waits this long for every member to rejoin (Kafka's rebalance timeout is the members'
# max.poll.interval.ms): a member frozen mid-rebalance (a GC pause, a paused VM) holds the whole group up
# to it, so it is 60 s, not Kafka's 300 s. A batch takes well under a second; a member stuck retrying an
# unreachable Redis longer than this leaves the group and rejoins when it polls again (offsets are fenced
# in Redis, so nothing is counted twice).
MAX_POLL_INTERVAL_MS = 60_000
# Without partitions this long after starting, a consumer is idle, not joining: more members than partitions,
# or a topic deleted under it (its `idle_exit_s` then counts, so it does not wait forever). Longer than a
# rebalance may take.
JOIN_WAIT_S = MAX_POLL_INTERVAL_MS / 1000 + 30.0
_TOO_LATE = (f"event time {{ts}} is before an event of this user whose id was forgotten (the last "
             f"{RECENT_IDS_N} ids are kept): it may be a repeat, so it is not applied")  # fmt: skip


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
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        )
        # An ad's counters are summed over these, and erasure and the tools look for a user's state in them:
        # a topic with more partitions is refused (`_apply`).
        self.partitions = list(range(settings.event_partitions))
        self.applied = self.state.applied_offsets(self.partitions)
        self.layout = FeastLayout.from_settings(settings)
        self.touched_ads: set[str] = set()
        self.touched_flow: tuple[set[str], set[tuple[str, str]]] = (set(), set())  # articles, pairs
        self.total = BatchReport()  # everything `run` has done so far
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))

    def run(self, *, stop: Callable[[], bool] = lambda: False, idle_exit_s: float | None = None) -> BatchReport:
        """Poll and apply batches until `stop()` or until nothing arrived for `idle_exit_s` seconds."""
        total = self.total
        # Objects made so far (Feast, pandas, kafka-python...) outlive the run: frozen, the full
        # collections that polling still sets off skip them.
        # Unfrozen at the end, so that they are collected as usual afterwards (and at exit).
        gc.freeze()
        started = idle_since = time.monotonic()
        try:
            while not stop():
                batch = self.consumer.poll(
                    timeout_ms=self.settings.consumer_batch_ms, max_records=self.settings.consumer_batch_size
                )
                if not batch:
                    self.refresh_rows()
                    if not self.consumer.assignment() and time.monotonic() - started < JOIN_WAIT_S:
                        idle_since = time.monotonic()  # still joining the group: not idle yet
                    elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                idle_since = time.monotonic()
                try:
                    _merge(total, self.apply(batch))
                except (DeadLetterUndelivered, StaleWrite, redis.ConnectionError, redis.TimeoutError) as error:
                    self._retry(batch, error, stop)
            # Rows written while another consumer committed the same ads or articles may miss its counts:
            # rewritten from the stored sums before leaving, as after every idle poll.
            try:
                self.refresh_rows()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("rows touched since the last refresh not rewritten before stopping: %s", error)
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
        events: list[tuple[int, Any, DecodedEvent]] = []  # (partition, record, event)
        last_offsets: dict[int, int] = {}
        for tp, records in batch.items():
            if tp.partition >= len(self.partitions):
                raise ValueError(
                    f"topic {self.topic} has a partition {tp.partition}, beyond ADLOOP_EVENT_PARTITIONS="
                    f"{len(self.partitions)}: set it to the topic's partition count"
                )
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
                    self._dead_letter(record, error, report)
                    continue
                events.append((tp.partition, record, event))
        events = self._drop_erased(events, report)

        users = self.state.user_states({(p, e.user_id) for p, _, e in events})
        parts = {p: PartitionBatch(offset=o, expected=self.applied.get(p))
                 for p, o in last_offsets.items() if o > self.applied.get(p, -1)}  # fmt: skip
        ad_increments: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        ad_last: dict[str, int] = {}
        flow: Counters = {}  # the batch's article-flow increments, all partitions
        snapshots: dict[tuple[str, int], tuple[str, int, dict[str, Any]]] = {}
        for partition, record, event in events:
            state = users[(partition, event.user_id)]
            repeat = repeat_of(state, event)
            if repeat == "duplicate":
                report.duplicates += 1
                continue
            if repeat == "too_late":
                self._dead_letter(record, InvalidEvent("too_late", _TOO_LATE.format(ts=event.ts.isoformat())), report)
                continue
            seen_until = (event.user_id, state.last_ts)
            if (
                event.event_type == EventType.ad_impression
                and 0 < state.last_ts < event.ts_ms
                and seen_until not in snapshots
            ):
                # What the ranker saw for this impression: a training row exact whatever the batch size.
                snapshots[seen_until] = (event.user_id, state.last_ts, user_features(state))
            previous = session_before(state, event)
            apply_user(state, event)
            remember(state, event)
            report.applied += 1
            part = parts[partition]
            part.states[event.user_id] = state
            if previous is not None and event.item_id:
                for key, fields in click_counters(previous, event.item_id, event.ts_ms).items():
                    for target in (flow.setdefault(key, {}), part.flow.setdefault(key, {})):
                        for name, value in fields.items():
                            merge_field(target, name, value)
            counters = ad_counter_fields(event)
            if counters and event.ad_id:
                for counter in counters:
                    ad_increments[event.ad_id][counter] += 1
                    part.ad_increments.setdefault(event.ad_id, {}).setdefault(counter, 0)
                    part.ad_increments[event.ad_id][counter] += 1
                ad_last[event.ad_id] = max(ad_last.get(event.ad_id, 0), event.ts_ms)
                part.ad_last[event.ad_id] = max(part.ad_last.get(event.ad_id, 0), event.ts_ms)
        self.dead_letters.flush()  # dead letters are durable before their offsets are stored

        user_rows: dict[int, list[tuple[str, int, dict[str, Any]]]] = {}
        for partition, part in parts.items():
            for state in part.states.values():
                prune(state)
            user_rows[partition] = [(u, s.last_ts, user_features(s)) for u, s in part.states.items()]
        ad_rows, stale = self._ad_rows(ad_increments, ad_last)
        articles, pairs = _flow_touched(flow)
        article_rows, pair_rows, flow_stale = self._flow_rows(flow, articles, pairs)
        name = _batch_name(batch)
        self.sink.write_offline(USER_VIEW, [*snapshots.values(), *(r for rows in user_rows.values() for r in rows)],
                                name=name)  # fmt: skip
        self.sink.write_offline(AD_VIEW, ad_rows, name=name)
        self.sink.write_offline(ARTICLE_VIEW, article_rows, name=name)
        self.sink.write_offline(TRANSITION_VIEW, pair_rows, name=name)

        committed, refused = self._commit(parts, stale, flow_stale)
        # The online rows follow the commits (each only over an older row): a crash in between leaves the
        # partitions' `written` lists, which their next owner rewrites (`_recover`).
        write_rows(self.state.redis, self.layout, USER_VIEW, [r for p in committed for r in user_rows[p]])
        if refused:  # the refused partitions' increments are not stored: rows from what is
            ad_rows, _ = self._ad_rows({}, {ad: 0 for p in committed for ad in parts[p].ad_last})
            articles = {a for p in committed for a in parts[p].articles_written}
            pairs = {(a, b) for p in committed for a, b in parts[p].pairs_written}
            article_rows, pair_rows, _ = self._flow_rows({}, articles, pairs)
        else:
            self.touched_ads.update(ad_last)
            self.touched_flow[0].update(articles)
            self.touched_flow[1].update(pairs)
        write_rows(self.state.redis, self.layout, AD_VIEW, ad_rows)
        write_rows(self.state.redis, self.layout, ARTICLE_VIEW, article_rows)
        write_rows(self.state.redis, self.layout, TRANSITION_VIEW, pair_rows)
        if refused:
            raise StaleWrite(refused)
        try:
            self.consumer.commit(
                {TopicPartition(self.topic, p): OffsetAndMetadata(o + 1, "", -1) for p, o in last_offsets.items()}
            )
        except KafkaError as error:  # the group moved on, or the broker is away: Redis holds the offsets that count
            log.warning("Kafka offset commit failed after the batch was stored (%s); the stored offsets hold", error)

        metrics.record_batch(report.applied, report.duplicates, report.dead_lettered, time.perf_counter() - started)
        return report

    def _commit(
        self, parts: dict[int, PartitionBatch], stale: dict[str, list[str]], flow_stale: dict[tuple[str, str], list]
    ) -> tuple[list[int], dict[int, tuple[int | None, int | None]]]:
        """Commit each partition's batch (atomic per partition); returns the committed partitions and the
        refused ones (partition -> (expected, stored offset))."""
        committed: list[int] = []
        refused: dict[int, tuple[int | None, int | None]] = {}
        for partition, part in parts.items():
            part.stale_counters = {ad: stale[ad] for ad in part.ad_last if stale.get(ad)}
            part.ads_written = sorted(part.ad_last)
            part.flow_stale = {key: flow_stale[key] for key in part.flow if flow_stale.get(key)}
            articles, pairs = _flow_touched(part.flow)
            part.articles_written, part.pairs_written = sorted(articles), sorted([a, b] for a, b in pairs)
            try:
                self.state.commit(partition, part)
            except StaleWrite as error:
                refused.update(error.moved)
                continue
            committed.append(partition)
            self.applied[partition] = part.offset
        return committed, refused

    def _recover(self, partitions: list[int]) -> None:
        """Rewrite the online rows of each partition's last committed batch from the stored state: its
        owner may have died between the commit and the rows (rows are only written over older ones)."""
        users: list[tuple[int, str]] = []
        ads: set[str] = set()
        articles: set[str] = set()
        pairs: set[tuple[str, str]] = set()
        for partition in partitions:
            written = self.state.written(partition)
            users += [(partition, u) for u in written["users"]]
            ads.update(written["ads"])
            articles.update(written["articles"])
            pairs.update((a, b) for a, b in written["pairs"])
        states = self.state.user_states(users)
        rows = [(u, s.last_ts, user_features(s)) for (_, u), s in states.items() if s.last_ts]
        write_rows(self.state.redis, self.layout, USER_VIEW, rows)
        ad_rows, _ = self._ad_rows({}, dict.fromkeys(ads, 0))
        write_rows(self.state.redis, self.layout, AD_VIEW, ad_rows)
        self._write_flow(articles, pairs)

    def refresh_rows(self) -> None:
        """Rewrite the online rows of ads and articles (and pairs) touched since the last refresh from their
        counters.

        An ad's counters are the sum over all partitions, which other consumers of the group write; a
        row written by one consumer may miss another's concurrent increment, so idle consumers rewrite theirs.
        """
        if self.touched_ads:
            rows, _ = self._ad_rows({}, dict.fromkeys(self.touched_ads, 0))
            write_rows(self.state.redis, self.layout, AD_VIEW, rows)
            self.touched_ads.clear()
        if self.touched_flow[0] or self.touched_flow[1]:
            self._write_flow(*self.touched_flow)
            self.touched_flow = (set(), set())

    def _write_flow(self, articles: set[str], pairs: set[tuple[str, str]]) -> None:
        """Rewrite these articles' and pairs' online rows from the stored counters (all partitions)."""
        article_rows, pair_rows, _ = self._flow_rows({}, articles, pairs)
        write_rows(self.state.redis, self.layout, ARTICLE_VIEW, article_rows)
        write_rows(self.state.redis, self.layout, TRANSITION_VIEW, pair_rows)

    def _flow_rows(
        self, increments: Counters, articles: set[str], pairs: set[tuple[str, str]]
    ) -> tuple[list[tuple[str, int, dict[str, Any]]], list[tuple[str, int, dict[str, Any]]], dict]:
        """Article and transition rows (features.article_flow) from the stored counters of every partition plus
        this batch's increments (not yet written), and per flow hash the fields that no row reads any more."""
        if not articles and not pairs:
            return [], [], {}
        # Two reads: the counts and last follows, then the daily sums that each pair's last follow selects.
        wanted: dict[tuple[str, str], list[str] | None] = {(ARTICLE, a): None for a in articles}
        for a, b in pairs:
            names = wanted.setdefault((NEXT, a), [])
            assert names is not None
            names += transition_fields(b)
        merged = self.state.flow_fields(wanted, self.partitions)
        for key, fields in increments.items():
            target = merged.setdefault(key, {})
            for name, value in fields.items():
                merge_field(target, name, value)
        last = {(a, b): merged[(NEXT, a)].get(f"l:{b}", 0) for a, b in pairs}
        sums: dict[tuple[str, str], list[str] | None] = {}
        for (a, b), ms in last.items():
            names = sums.setdefault((NEXT, a), [])
            assert names is not None
            names += decay_fields(b, ms)
        for key, fields in self.state.flow_fields(sums, self.partitions).items():
            target, mine = merged[key], increments.get(key, {})
            for name, value in fields.items():  # stored daily sums, plus this batch's already merged above
                target[name] = value + mine.get(name, 0)
        stale: dict[tuple[str, str], list[str]] = {}
        article_rows = []
        for a in sorted(articles):
            fields = merged[(ARTICLE, a)]
            row = article_row(fields)
            article_rows.append((a, row["last_click_ms"], row))
            stale[(ARTICLE, a)] = stale_article_fields(fields)
        pair_rows = []
        for a, b in sorted(pairs):
            row = transition_row(merged[(NEXT, a)], b)
            pair_rows.append((pair_id(a, b), row["transition_last_ms"], row))
            stale.setdefault((NEXT, a), []).extend(stale_transition_fields(b, last[(a, b)]))
        return article_rows, pair_rows, stale

    def _ad_rows(
        self, increments: dict[str, dict[str, int]], last: dict[str, int]
    ) -> tuple[list[tuple[str, int, dict[str, Any]]], dict[str, list[str]]]:
        """Ad rows from the stored counters (all partitions) plus this batch's increments (not yet written),
        and per ad the counter fields that no window reaches any more."""
        rows, stale = [], {}
        for ad, (hours, fine, stored_last) in self.state.ad_counters(last, self.partitions).items():
            for counter, amount in increments.get(ad, {}).items():
                add_counter(hours, fine, counter, amount)
            ts = max(stored_last, last[ad])
            rows.append((ad, ts, ad_features(hours, fine, ts)))
            stale[ad] = stale_ad_counters(hours, fine, ts)
        return rows, stale

    def _dead_letter(self, record: Any, error: InvalidEvent, report: BatchReport) -> None:
        self.dead_letters.send(record, error)
        report.dead_lettered[error.reason] = report.dead_lettered.get(error.reason, 0) + 1

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.dead_letters.close()

    def _retry(self, batch: dict[TopicPartition, list[Any]], error: Exception, stop: Callable[[], bool]) -> None:
        """A batch that stored nothing (or whose outcome is unknown): read its partitions again from the
        offsets stored in Redis, once Redis answers."""
        log.warning("batch not committed, read again from the stored offsets: %s", error)
        owned = self.consumer.assignment()
        while True:
            time.sleep(RETRY_PAUSE_S)
            try:
                self.applied = self.state.applied_offsets(self.partitions)
                self._recover(sorted(tp.partition for tp in batch if tp in owned))  # rows of what did commit
                break
            except (redis.ConnectionError, redis.TimeoutError) as down:
                log.warning("Redis unavailable (%s), retrying in %.1f s", down, RETRY_PAUSE_S)
                if stop():
                    return
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
                "If so, `adloop consume --reset-offsets` forgets the stored offsets (features and users' recent "
                "event ids are kept, so events seen before still count once)."
            )

    def _check_time(self, event: DecodedEvent) -> None:
        skew_ms = self.settings.max_future_skew_s * 1000
        if event.ts_ms > time.time() * 1000 + skew_ms:
            raise InvalidEvent(
                "future_timestamp", f"ts {event.ts.isoformat()} is more than {self.settings.max_future_skew_s} s ahead"
            )

    def _drop_erased(self, events: list[tuple[int, Any, DecodedEvent]], report: BatchReport) -> list:
        """Events still in Kafka of a user erased since (`adloop users forget`) would bring their state back:
        skipped, counted. An event after the erasure is new activity and counts."""
        erased = tombstones.erased_among(self.state.redis, sorted({e.user_id for _, _, e in events}))
        if not erased:
            return events
        kept = [item for item in events if item[2].ts_ms > erased.get(item[2].user_id, -1)]
        report.erased += len(events) - len(kept)
        metrics.ERASED.inc(len(events) - len(kept))
        return kept


class _Rebalance(ConsumerRebalanceListener):
    """Batches are applied and committed inside `poll`'s caller, so a revoke finds nothing in flight."""

    def __init__(self, owner: FeatureConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        owner = self.owner
        owner.applied = owner.state.applied_offsets(owner.partitions)  # another consumer may have moved them
        for tp in assigned:
            if tp.partition in owner.applied:
                owner.consumer.seek(tp, owner.applied[tp.partition] + 1)
        owner._recover(sorted(tp.partition for tp in assigned))
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))


def _flow_touched(flow: Counters) -> tuple[set[str], set[tuple[str, str]]]:
    """The articles and the (a, b) pairs whose online rows these article-flow counters change."""
    articles = {str(a) for kind, a in flow if kind == ARTICLE}
    pairs = {(str(a), b) for (kind, a), fields in flow.items() if kind == NEXT for b in followers(fields)}
    return articles, pairs


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
