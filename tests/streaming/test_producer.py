"""produce_events: pacing (fake clock), summary, and a replay through the real broker and back."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adloop.settings import Settings
from streaming.events import Event, parse_event
from streaming.producer import BrokerUnavailable, build_producer, produce_events
from streaming.replay import read
from tests.support.stack import read_back

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Future:
    def add_errback(self, callback) -> _Future:
        return self


class RecordingProducer:
    """Records (time, topic, key, value) of each send; stands in for KafkaProducer in unit tests only."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.sent, self.flushed = clock, [], False

    def send(self, topic: str, *, key, value) -> _Future:
        self.sent.append((self.clock(), topic, key, value))
        return _Future()

    def flush(self, timeout: float | None = None) -> None:
        self.flushed = True


def _event(i: int, seconds: float, kind: str = "page_view") -> Event:
    return Event(event_id=f"e{i}", schema_version=1, event_type=kind, user_id=f"u{i % 3}",
                 ts=T0 + timedelta(seconds=seconds))  # fmt: skip


def _produce(events, **pacing):
    clock = FakeClock()
    producer = RecordingProducer(clock)
    summary = produce_events(producer, "t", events, clock=clock, sleep=clock.sleep, **pacing)
    return producer, summary, [t - 100.0 for t, *_ in producer.sent]


def test_max_rate_spaces_sends_evenly() -> None:
    producer, summary, times = _produce([_event(i, 0) for i in range(5)], max_rate=10)
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert summary.count == 5 and summary.seconds == pytest.approx(0.4) and summary.rate == pytest.approx(12.5)
    assert producer.flushed


def test_speed_compresses_event_time() -> None:
    _, _, times = _produce([_event(0, 0), _event(1, 10), _event(2, 30)], speed=10)
    assert times == pytest.approx([0.0, 1.0, 3.0])


def test_slower_of_speed_and_max_rate_wins() -> None:
    _, _, times = _produce([_event(0, 0), _event(1, 0.1), _event(2, 30)], speed=10, max_rate=2)
    assert times == pytest.approx([0.0, 0.5, 3.0])


def test_no_pacing_never_sleeps_and_summary_counts_types() -> None:
    events = [_event(0, 0), _event(1, 5, "search"), b"{not json", _event(3, 9, "search")]
    producer, summary, _ = _produce(events)
    assert summary.by_type == {"page_view": 1, "search": 2, "invalid": 1}
    assert summary.invalid == 1
    assert (summary.first_ts, summary.last_ts) == ("2026-01-05T08:00:00.000Z", "2026-01-05T08:00:09.000Z")
    assert [(key, value) for _, _, key, value in producer.sent][:3] == [("u0", events[0]), ("u1", events[1]),
                                                                        (None, b"{not json")]  # fmt: skip


def test_progress_reports_every_message_once() -> None:
    reported: list[int] = []
    clock = FakeClock()
    produce_events(RecordingProducer(clock), "t", [_event(i, 0) for i in range(2_500)], progress=reported.append,
                   clock=clock, sleep=clock.sleep)  # fmt: skip
    assert reported == [1_000, 1_000, 500]


def test_no_broker_fails_fast_saying_how_to_start_it() -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")  # nothing listens on port 1
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="adloop stack up"):
        build_producer(settings, bootstrap_timeout_ms=500)
    assert time.monotonic() - started < 5


@pytest.mark.integration
def test_replay_through_the_real_broker(local_stack: Settings, topic: str, tmp_path: Path) -> None:
    path = tmp_path / "ub.csv"
    rows = [f"{user},{100 + i},{7 + i % 2},{'pv' if i % 4 else 'cart'},{1511658000 + i}" for i, user in
            enumerate([11, 12, 13, 11, 14, 12, 15, 11, 16, 17] * 3)]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    producer = build_producer(local_stack)
    try:
        summary = produce_events(producer, topic, read(path, "taobao"))
    finally:
        producer.close()
    assert summary.count == 30 and summary.failed == 0

    messages = read_back(local_stack, topic, 30)
    assert len(messages) == 30
    events = [parse_event(m.value) for m in messages]
    assert all(m.key == e.user_id.encode() for m, e in zip(messages, events, strict=True))
    assert sorted(e.event_id for e in events) == sorted(e.event_id for e in read(path, "taobao"))
    by_partition: dict[int, list[int]] = {}
    for m, e in zip(messages, events, strict=True):
        by_partition.setdefault(m.partition, []).append(e.ts_ms)  # the file's rows are one second apart
    assert all(ids == sorted(ids) for ids in by_partition.values())  # each user's events stay in order
    partitions_of_user = {}
    for m, e in zip(messages, events, strict=True):
        partitions_of_user.setdefault(e.user_id, set()).add(m.partition)
    assert all(len(p) == 1 for p in partitions_of_user.values())  # key = user id: one partition per user
