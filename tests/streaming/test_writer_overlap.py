"""The consumer's writer thread: batch N+1 folds on top of batch N while N is written; effect-once still holds.

Real Kafka, Redis and Feast; the writer is held back (or failed) at chosen batches through a subclass.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from adloop.settings import Settings
from features.online import features_via_feast
from features.store import AD_VIEW
from streaming.consumer import FeatureConsumer
from streaming.events import Event
from tests.conftest import produce
from tests.streaming import batch_features
from tests.streaming.test_aggregates import synthetic_events
from tests.streaming.test_consumer import assert_online_equals_batch

pytestmark = pytest.mark.integration
GROUP = "overlap-test"


class Crash(Exception):
    """Stands for the process dying at that point: nothing after it is written."""


def stream() -> tuple[list[Event], list[Event]]:
    """Events of few users (each batch touches users of the batch before it), plus repeats of some events a
    batch or so later (while the original may still be in flight). Returns (distinct events, messages)."""
    events = synthetic_events(3000, users=40, seed=21)
    messages = list(events)
    for n in range(0, len(events), 50):
        messages.insert(min(len(messages), n + 300), events[n])
    return events, messages


def assert_features_equal_a_recomputation(settings: Settings, events: list[Event]) -> None:
    assert_online_equals_batch(settings, events)
    table = batch_features.frame(events)
    ads = sorted(table["ad_id"].dropna().unique())
    online = features_via_feast(settings, AD_VIEW, ads)
    for ad in ads:
        mine = table[table["ad_id"] == ad]
        assert online[ad]["ad_impressions_7d"] == int((mine["type"] == "ad_impression").sum())
        assert online[ad]["ad_clicks_7d"] == int((mine["type"] == "ad_click").sum())


def stored_offsets(settings: Settings) -> dict[int, int]:
    client = redis.Redis.from_url(settings.redis_url)
    return {int(p): int(o) for p, o in client.hgetall(f"adloop:offsets:{GROUP}:{settings.events_topic}").items()}


def kafka_committed(settings: Settings) -> dict[int, int]:
    reader = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=GROUP,
                           enable_auto_commit=False)  # fmt: skip
    committed = {}
    for partition in reader.partitions_for_topic(settings.events_topic) or ():
        offset = reader.committed(TopicPartition(settings.events_topic, partition))
        if offset is not None:
            committed[partition] = offset
    reader.close()
    return committed


def finish(settings: Settings, messages: int) -> None:
    """A fresh consumer of the group applies whatever is left (from the offsets stored in Redis)."""
    left = messages - sum(o + 1 for o in stored_offsets(settings).values())
    consumer = FeatureConsumer(settings, redis_client=redis.Redis.from_url(settings.redis_url), group=GROUP)
    report = consumer.run(stop=lambda: consumer.total.handled >= left, idle_exit_s=20)
    assert report.handled == left


class HeldWriter(FeatureConsumer):
    """Holds the write of batch `hold_at` (1-based) until the next batch has folded, then either crashes
    before that write (`write_lands=False`) or lets it land and crashes right after the next fold."""

    overlap_only_when_behind = False  # every batch overlapped, full or not

    def __init__(self, *args: Any, hold_at: int, write_lands: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold_at, self.write_lands = hold_at, write_lands
        self.writes = 0
        self.next_folded = threading.Event()
        self.held: Any = None  # the batch whose write is held
        self.overlaid: list[str] = []  # users of the next batch whose state came from the held batch

    def _write(self, folded: Any) -> float:
        self.writes += 1
        if self.writes == self.hold_at:
            self.held = folded
            assert self.next_folded.wait(30), "the next batch never folded while this one was in flight"
            if not self.write_lands:
                raise Crash("died before batch N's EXEC")
        return super()._write(folded)

    def _fold(self, batch: Any) -> Any:
        folded = super()._fold(batch)
        if self.held is not None:
            held = self.held.states
            self.overlaid = [u for u, state in folded.states.items() if u in held and state is held[u]]
            self.next_folded.set()
            if self.write_lands:
                self._pending.future.result()  # let N land first
            raise Crash("died after batch N+1's fold, before its write")
        return folded


@pytest.mark.parametrize("write_lands", [False, True], ids=["before-N-lands", "after-N-lands"])
def test_a_crash_between_the_next_fold_and_the_write_changes_no_feature(
    feature_settings: Settings, write_lands: bool
) -> None:
    events, messages = stream()
    produce(feature_settings, messages)
    client = redis.Redis.from_url(feature_settings.redis_url)
    victim = HeldWriter(feature_settings, redis_client=client, group=GROUP, hold_at=4, write_lands=write_lands)
    with pytest.raises(Crash):
        victim.run(idle_exit_s=20)
    assert victim.overlaid, "batch N+1 did not fold on top of batch N's states in memory"
    held_offsets = victim.held.offsets
    landed = stored_offsets(feature_settings)
    if write_lands:
        assert all(landed[p] == o for p, o in held_offsets.items())
    else:
        assert all(landed.get(p, -1) < o for p, o in held_offsets.items()), "batch N was written"
        assert all(kafka_committed(feature_settings).get(p, 0) <= o for p, o in held_offsets.items())
    assert 0 < sum(o + 1 for o in landed.values()) < len(messages), "the crash must land mid-stream"

    finish(feature_settings, len(messages))
    assert_features_equal_a_recomputation(feature_settings, events)


class FailingStore:
    """Wraps the consumer's StateStore: the `fail_at`-th batch transaction raises a connection error."""

    def __init__(self, store: Any, fail_at: int) -> None:
        self.store, self.fail_at = store, fail_at
        self.calls: list[dict[int, int]] = []  # offsets of each commit_batch call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def commit_batch(self, **kwargs: Any) -> None:
        self.calls.append(kwargs["offsets"])
        if len(self.calls) == self.fail_at:
            time.sleep(0.3)  # the main thread folds the next batch meanwhile
            raise redis.ConnectionError("Redis went away (injected)")
        self.store.commit_batch(**kwargs)


def test_a_failed_write_stops_the_consumer_with_the_batch_uncommitted(feature_settings: Settings) -> None:
    events, messages = stream()
    produce(feature_settings, messages)
    consumer = FeatureConsumer(feature_settings, redis_client=redis.Redis.from_url(feature_settings.redis_url),
                               group=GROUP)  # fmt: skip
    consumer.state = failing = FailingStore(consumer.state, fail_at=3)
    consumer.overlap_only_when_behind = False
    folds = []
    original_fold = consumer._fold
    consumer._fold = lambda batch: folds.append(batch) or original_fold(batch)
    with pytest.raises(redis.ConnectionError, match="injected"):
        consumer.run(idle_exit_s=20)

    assert len(failing.calls) == 3, "a batch was handed to the writer after a failed write"
    assert len(folds) <= 4  # at most the batch folded while the failed one was in flight
    written = {}
    for offsets in failing.calls[:2]:
        written.update(offsets)
    assert stored_offsets(feature_settings) == written  # batch 3 is not in Redis
    assert kafka_committed(feature_settings) == {p: o + 1 for p, o in written.items()}  # nor in Kafka
    assert consumer.total.handled < len(messages)

    finish(feature_settings, len(messages))
    assert_features_equal_a_recomputation(feature_settings, events)


class SlowWriter(FeatureConsumer):
    """Writes each batch 0.4 s late, and notes whether a revoke found a batch in flight."""

    overlap_only_when_behind = False

    revoked_in_flight = 0

    def _write(self, folded: Any) -> float:
        time.sleep(0.4)
        return super()._write(folded)

    def _collect(self, *, from_listener: bool = False) -> None:
        if from_listener and self._pending is not None:
            self.revoked_in_flight += 1
        super()._collect(from_listener=from_listener)


def test_a_revoke_with_a_batch_in_flight_hands_over_its_writes(feature_settings: Settings) -> None:
    """A second member joins while the first has a write in flight: the revoke waits for it, the partitions
    move with their offsets and states written, and the features equal a recomputation."""
    events, messages = stream()
    produce(feature_settings, messages)
    client = redis.Redis.from_url(feature_settings.redis_url)
    first = SlowWriter(feature_settings, redis_client=client, group=GROUP)
    errors: list[BaseException] = []

    def run(consumer: FeatureConsumer) -> None:
        try:
            consumer.run(idle_exit_s=8)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(first,))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while first.total.handled < 500:
        assert time.monotonic() < deadline and threads[0].is_alive(), errors
        time.sleep(0.01)
    second = SlowWriter(feature_settings, redis_client=client, group=GROUP)
    threads.append(threading.Thread(target=run, args=(second,)))
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert first.revoked_in_flight >= 1, "the revoke found no batch in flight: this test proved nothing"
    assert second.total.applied > 0, "the second member never took partitions"
    assert first.total.applied + second.total.applied == len(events)
    assert_features_equal_a_recomputation(feature_settings, events)
