"""`adloop consume --processes N` (adloop/runs/consumers.py) against real Kafka and Redis: N children of one
group apply every event once, one /metrics sums them, a dead child comes back, SIGTERM stops them all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from adloop.runs.isolated import isolated_settings
from adloop.settings import PROJECT_ROOT, Settings
from features.online import features_via_feast
from features.redis_client import redis_client
from features.store import USER_VIEW
from streaming.consumer import FeatureConsumer
from streaming.events import Event
from tests.support import batch_features
from tests.support.events import synthetic_events
from tests.support.serving import free_port
from tests.support.stack import TEST_REDIS_DB, adloop_env, applied_events, produce

pytestmark = pytest.mark.integration
PARTITIONS = 12


@pytest.fixture
def settings12(local_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    with isolated_settings(
        local_stack, tmp_path, redis_db=TEST_REDIS_DB, prefix="adloop.test.procs", partitions=PARTITIONS,
        consumer_batch_size=250,
    ) as settings:  # fmt: skip
        yield settings


class Consume:
    """`adloop consume ...` as a subprocess, its output collected line by line."""

    def __init__(self, settings: Settings, *args: str) -> None:
        self.port = free_port()
        # Not the test process's PROMETHEUS_* (Feast's, once imported here): the supervisor sets its own.
        env = {k: v for k, v in os.environ.items() if "PROMETHEUS" not in k.upper()}
        env.update(adloop_env(settings), PYTHONPATH=str(PROJECT_ROOT))
        command = [sys.executable, "-m", "adloop.cli", "consume", "--metrics-port", str(self.port), *args]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def assignments(self, since: int = 0) -> dict[str, list[int]]:
        """Process name (`main` for the in-process consumer) -> the partitions it was last assigned, from
        output line `since` on."""
        latest: dict[str, list[int]] = {}
        for line in list(self.lines)[since:]:
            if "partitions assigned: [" in line:
                who = line.split()[3] if "consumer-" in line else "main"
                latest[who] = json.loads(line.split("partitions assigned: ")[1])
        return latest

    def wait_assigned(self, members: int, partitions: int = PARTITIONS, timeout_s: float = 90, since: int = 0) -> None:
        """Until `members` of this command hold all `partitions` between them (assigned from line `since` on)."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = self.assignments(since)
            owned = sorted(p for ps in held.values() for p in ps)
            if sum(map(bool, held.values())) == members and owned == list(range(partitions)):
                return
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"never {members} members over {partitions} partitions: {held}"
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        """Sample name -> value (summed over labels) of its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                name = name.split("{")[0]
                totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    def wait_metric(self, name: str, value: float, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = self.metrics().get(name)
            except OSError:
                seen = "no answer"
            if seen == value:
                return
            assert self.process.poll() is None, self.output()
            time.sleep(0.2)
        raise AssertionError(f"{name} is {seen}, not {value}:\n{self.output()}")

    def stop(self, timeout_s: float = 20) -> float:
        """SIGTERM; returns the seconds until it exited."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.reader.join(5)
        return time.monotonic() - started


def assert_applied_once(settings: Settings, events: list[Event]) -> None:
    """Every user's online features equal a recount of the events, and every event counts once: the 7-day
    counts add up to the number of events, the stored offsets to the records."""
    expected = batch_features.user_features(batch_features.frame(events))
    online = features_via_feast(settings, USER_VIEW, sorted(expected))
    for user, features in expected.items():
        batch_features.assert_features_equal(features, online[user], user)
    kinds = batch_features.TYPES
    assert sum(online[u][f"{kind}_7d"] for u in expected for kind in kinds) == len(events)
    assert applied_events(settings) == len(events)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (the fork server and the consumers it forked)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (not zombies)."""
    running = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
        except OSError:
            pass
    return running


def test_two_processes_apply_every_event_once_a_dead_one_comes_back_and_sigterm_stops_all(settings12: Settings) -> None:
    events = synthetic_events(4000, users=60, seed=21)
    first, later = events[:3000], events[3000:]
    run = Consume(settings12, "--processes", "2")
    try:
        run.wait_assigned(members=2)
        produce(settings12, first)  # only now, so that both children share the work
        run.wait_metric("adloop_consumer_events_applied_total", len(first))  # one endpoint, both children summed
        assert run.metrics()["adloop_consumer_processes"] == 2

        victim = int(re.search(r"consumer 1 started \(pid (\d+)\)", run.output()).group(1))
        assert victim in descendants(run.process.pid)
        killed_at = len(run.lines)
        os.kill(victim, signal.SIGKILL)
        run.wait_metric("adloop_consumer_restarts_total", 1)
        run.wait_metric("adloop_consumer_processes", 2)
        run.wait_assigned(members=2, since=killed_at)  # its successor holds partitions again
        produce(settings12, later)
        run.wait_metric("adloop_consumer_events_applied_total", len(events))  # the dead child's count stays
        children = descendants(run.process.pid)
    finally:
        seconds = run.stop()
    assert run.process.returncode == 0, run.output()
    assert seconds < 15, f"took {seconds:.1f} s to stop"
    assert f"consumer 1 (pid {victim}) died (signal SIGKILL); restarting it" in run.output()
    # Both live children ended their run (finishing their batch, closing their Kafka consumer).
    applied = [int(line.split("applied ")[1].split(",")[0]) for line in run.lines[killed_at:]
               if "consumer-" in line and " applied " in line]  # fmt: skip
    assert len(applied) == 2 and min(applied) > 0, run.output()
    assert f"applied {len(events)}, duplicates 0, restarts 1" in run.output()
    wait_for(lambda: not alive(children), run, timeout_s=5, running=False)  # the fork server leaves on its own
    assert_applied_once(settings12, events)


def test_scaling_from_one_to_two_processes_while_events_flow_loses_and_repeats_nothing(settings12: Settings) -> None:
    events = synthetic_events(12_000, users=80, seed=22)
    sent = 500
    flowing = threading.Event()

    def flow() -> None:  # 50 events every 0.1 s while `flowing`: the group changes while they arrive
        nonlocal sent
        producer = KafkaProducer(bootstrap_servers=settings12.kafka_bootstrap_servers, acks="all", linger_ms=5)
        while flowing.is_set() and sent < len(events):
            for event in events[sent : sent + 50]:
                producer.send(settings12.events_topic, key=event.user_id.encode(), value=event.to_bytes())
            producer.flush(10)
            sent += 50
            time.sleep(0.1)
        producer.close()

    # The first member: a consumer of this process (no start-up import to wait for), with work done.
    single = FeatureConsumer(settings12, redis_client=redis_client(settings12))
    single_stop = threading.Event()
    single_run = threading.Thread(target=lambda: single.run(stop=single_stop.is_set), daemon=True)
    single_run.start()
    produce(settings12, events[:sent])
    scaled = Consume(settings12, "--processes", "2")
    producer = threading.Thread(target=flow, daemon=True)
    try:
        wait_for(lambda: "consumer 1 started" in scaled.output(), scaled, timeout_s=120)  # its children join next
        assert single.total.applied == sent
        flowing.set()
        producer.start()
        wait_for(lambda: sum(map(bool, scaled.assignments().values())) == 2, scaled)  # the group grew 1 -> 3
        time.sleep(1.0)
        single_stop.set()  # and shrinks to 2: it finishes its batch and leaves the group
        single_run.join(15)
        assert not single_run.is_alive()
        scaled.wait_assigned(members=2)
        time.sleep(1.0)
        flowing.clear()
        producer.join(10)
        assert single.total.applied > 500 and sent < len(events)
        wait_for(lambda: applied_events(settings12) == sent, scaled)
        # The supervisor killed outright: its children see it gone and stop by themselves, none is left behind.
        children = descendants(scaled.process.pid)
        scaled.process.kill()
        scaled.process.wait(10)
        wait_for(lambda: not alive(children), scaled, timeout_s=20, running=False)
        assert sum("the supervisor is gone: stopping" in line for line in scaled.lines) == 2, scaled.output()
    finally:
        flowing.clear()
        single_stop.set()
        if scaled.process.poll() is None:
            scaled.stop()
    assert_applied_once(settings12, events[:sent])


def wait_for(condition: Callable[[], bool], run: Consume, timeout_s: float = 60, running: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert not running or run.process.poll() is None, run.output()
        assert time.monotonic() < deadline, run.output()
        time.sleep(0.1)
