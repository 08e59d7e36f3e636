"""The feature consumer under faults, against real processes: its own broker and Redis (tests/faults/conftest.py),
stopped and restarted mid-consumption, and a consumer frozen until its partitions move.

Each test replays a seeded stream and then asserts the exact outcome: every partition's stored offset at
the end of the topic, and online features equal to a batch recomputation of the stream (an event applied
twice or lost would change a count).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kafka.errors import KafkaError

from adloop.runs.isolated import isolated_settings
from adloop.settings import Settings
from streaming.consumer import FeatureConsumer
from tests.faults.conftest import start, stop, wait_redis
from tests.streaming.test_consumer import assert_online_equals_batch
from tests.support.events import synthetic_events
from tests.support.stack import adloop_env, applied_events, produce, stored_offsets

pytestmark = pytest.mark.integration
OUTAGE_S = 5.0  # the issue suggests 15 s; 5 s is as real an outage to the clients and keeps the suite short


@pytest.fixture
def fault_settings(fault_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    # the broker may have restarted under the fixture's admin client: deleting its topics can fail, and
    # they go with the fault stack anyway
    with (
        contextlib.suppress(KafkaError),
        isolated_settings(
            fault_stack, tmp_path, redis_db=1, prefix="adloop.test.events", consumer_batch_size=100
        ) as settings,
    ):
        yield settings


def _applied(settings: Settings, group: str = "adloop-features") -> int:
    """Events stored as applied (sum over partitions of last applied offset + 1); Redis must answer."""
    return applied_events(settings, group)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # Redis restarting: ask again
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def _consuming(settings: Settings, expected: int) -> Iterator[tuple[FeatureConsumer, threading.Thread]]:
    """A consumer in a thread until `expected` events are applied; stopped on the way out whatever happened,
    so a failed test leaves no client asking a restarted broker for its topic in every later test."""
    consumer = FeatureConsumer(settings, redis_client=redis.Redis.from_url(settings.redis_url), group="adloop-features")
    quit_ = threading.Event()
    done = lambda: quit_.is_set() or _applied_or_zero(settings) >= expected  # noqa: E731
    thread = threading.Thread(target=consumer.run, kwargs={"stop": done}, daemon=True)
    thread.start()
    try:
        yield consumer, thread
    finally:
        quit_.set()
        thread.join(timeout=30)


def _applied_or_zero(settings: Settings) -> int:
    try:
        return _applied(settings)
    except redis.RedisError:
        return 0


@pytest.mark.parametrize("service", ["kafka", "redis"])
def test_a_restart_during_consumption_changes_no_feature(fault_settings: Settings, service: str) -> None:
    events = synthetic_events(4000, users=60, seed=21)
    produce(fault_settings, events)
    with _consuming(fault_settings, len(events)) as (consumer, thread):
        _wait_for(lambda: _applied(fault_settings) >= 800, 60, "the first batches")
        stop(fault_settings, service)
        time.sleep(OUTAGE_S)
        start(fault_settings, service)
        wait_redis(fault_settings)
        thread.join(timeout=120)
        assert not thread.is_alive(), f"the consumer did not finish after the {service} restart"
    assert _applied(fault_settings) == len(events)  # every partition's offset at the topic's end
    # nothing counted twice (a batch whose reply was lost is not re-applied: its offsets say so)
    assert consumer.total.duplicates == 0 and consumer.total.applied <= len(events)
    assert_online_equals_batch(fault_settings, events)


def test_a_frozen_consumer_resumed_after_its_partitions_moved_regresses_nothing(
    fault_settings: Settings, tmp_path: Path
) -> None:
    events = synthetic_events(6000, users=90, seed=22)
    env = {**os.environ, **adloop_env(fault_settings)}
    command = [sys.executable, "-m", "adloop.cli", "consume", "--idle-exit", "4", "--metrics-port", "0"]
    regressions: list[str] = []
    watching = threading.Event()

    def watch_offsets() -> None:  # samples every partition's stored offset: it must never decrease
        highest: dict[int, int] = {}
        while not watching.is_set():
            for partition, offset in stored_offsets(fault_settings).items():
                if offset < highest.get(partition, -1):
                    regressions.append(f"partition {partition}: {highest[partition]} -> {offset}")
                highest[partition] = max(offset, highest.get(partition, -1))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_offsets, daemon=True)
    watcher.start()
    producer = threading.Thread(target=lambda: [produce(fault_settings, events[i : i + 500]) or time.sleep(0.25)
                                                for i in range(0, len(events), 500)])  # fmt: skip
    # output to files, not pipes: a pipe nobody reads until the end would block a talkative process
    launch = lambda name: subprocess.Popen(command, env=env, stdout=(tmp_path / f"{name}.log").open("w"),  # noqa: E731
                                           stderr=subprocess.STDOUT)  # fmt: skip
    printed = lambda name: (tmp_path / f"{name}.log").read_text()  # noqa: E731
    frozen = launch("frozen")
    successor = None
    try:
        producer.start()
        try:
            _wait_for(lambda: _applied(fault_settings) >= 1000 or frozen.poll() is not None, 120, "the first batches")
        except AssertionError:
            frozen.kill()
            applied = _applied(fault_settings)
            raise AssertionError(f"the first consumer applied {applied}: {printed('frozen')}") from None
        assert frozen.poll() is None, printed("frozen")
        frozen.send_signal(signal.SIGSTOP)  # e.g. a long GC pause or a paused VM, mid-batch or between batches
        at_freeze = _applied(fault_settings)
        successor = launch("successor")
        # the group expels the frozen member after its session timeout (10 s); its partitions move on
        try:
            _wait_for(lambda: _applied(fault_settings) >= at_freeze + 1500 or successor.poll() is not None, 150,
                      "the successor to take over")  # fmt: skip
        except AssertionError as error:
            raise AssertionError(f"{error}: {_applied(fault_settings)} applied, {at_freeze} at the freeze; "
                                 f"the successor printed: {printed('successor')}") from None  # fmt: skip
        assert successor.poll() is None, f"the successor exited early: {printed('successor')}"
        frozen.send_signal(signal.SIGCONT)
        producer.join(timeout=60)
        _wait_for(lambda: _applied(fault_settings) == len(events), 90, "every event applied")
        for process in (frozen, successor):
            process.wait(timeout=60)
    finally:
        watching.set()
        for process in (frozen, successor):
            if process and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
    assert regressions == []
    assert frozen.returncode == 0 and successor.returncode == 0, printed("frozen") + printed("successor")
    assert_online_equals_batch(fault_settings, events)
