"""Ingest, where the time goes: the batch transaction's client CPU against its wait, and the writer thread's overlap.

    python -m bench.ingest_overlap [--events N] [--part transaction|overlap|both]

On the local stack, Redis db 5 (emptied, as bench.ingest does) and a fresh topic, the Taobao slice:
  transaction: the consumer's MULTI/EXEC of user states and online rows, batches of 5,000 events, per event:
      queueing the commands (row encoding + redis-py's command stack), packing them (redis-py's
      `pack_commands`, hiredis' `pack_command` per command) and `execute()` (pack + send + replies), its
      thread CPU and its wait (wall - CPU: Redis working, the GIL released);
  overlap: bench.ingest's (b) with the same code twice, batch N's write overlapped with batch N+1's fold
      (as `run()` does) and serial (each batch collected right after its hand-over), with the process CPU,
      the writer thread's CPU and the main thread's time folding and waiting for the writer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import redis
import redis.connection
from kafka.admin import KafkaAdminClient

from adloop.settings import get_settings
from bench.ingest import TimedConsumer, isolated_settings, load_events
from features.online import FeastLayout, write_rows
from features.store import USER_VIEW
from streaming.aggregates import UserState, apply_user, prune, user_features
from streaming.producer import build_producer, produce_events
from streaming.state_store import StateStore


def transaction(settings: Any, events: list[Any]) -> None:
    layout = FeastLayout.from_settings(settings)
    store = StateStore(redis.Redis.from_url(settings.redis_url), group="bench", topic="bench")
    connection_class = redis.connection.AbstractConnection
    pack_commands = connection_class.pack_commands
    timing = dict.fromkeys(("queue", "pack", "execute wall", "execute CPU"), 0.0)

    def timed_pack(self: Any, commands: Any) -> Any:
        started = time.thread_time()
        packed = pack_commands(self, commands)
        timing["pack"] += time.thread_time() - started
        return packed

    connection_class.pack_commands = timed_pack
    states: dict[str, UserState] = {}
    try:
        for first in range(0, len(events), 5000):
            users: dict[str, UserState] = {}
            for event in events[first : first + 5000]:
                users[event.user_id] = apply_user(users.get(event.user_id) or states.get(event.user_id) or UserState(),
                                                  event)  # fmt: skip
            for state in users.values():
                prune(state)
            states.update(users)
            rows = [(u, s.last_ts, user_features(s)) for u, s in users.items()]
            blobs = {f"adloop:state:user:{u}": StateStore.dump_state(s) for u, s in users.items()}
            pipe = store.transactions.pipeline(transaction=True)
            started = time.thread_time()
            pipe.mset(blobs)
            write_rows(pipe, layout, USER_VIEW, rows)
            pipe.hset(store.offsets_key, mapping={"0": first})
            timing["queue"] += time.thread_time() - started
            wall, cpu = time.perf_counter(), time.thread_time()
            pipe.execute()
            timing["execute wall"] += time.perf_counter() - wall
            timing["execute CPU"] += time.thread_time() - cpu
    finally:
        connection_class.pack_commands = pack_commands
    us = {name: seconds / len(events) * 1e6 for name, seconds in timing.items()}
    print(f"transaction, per event ({len(events):,} events, {len(states):,} users; us of this thread):")
    print(f"  queue (encode rows, command stack) {us['queue']:5.1f}")
    print(f"  execute: wall {us['execute wall']:5.1f} = CPU {us['execute CPU']:5.1f} (of which pack_commands "
          f"{us['pack']:5.1f}) + wait {us['execute wall'] - us['execute CPU']:5.1f}")  # fmt: skip


class Probe(TimedConsumer):
    """bench.ingest's (b) consumer, timing the main thread's folds and waits and the writer thread's CPU."""

    def __init__(self, *args: Any, serial: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serial = serial
        self.fold_s = self.wait_s = self.write_wall_s = self.write_cpu_s = 0.0
        self.sizes: list[int] = []

    def _fold(self, batch: Any) -> Any:
        started = time.perf_counter()
        folded = super()._fold(batch)
        self.fold_s += time.perf_counter() - started
        self.sizes.append(sum(map(len, batch.values())))
        return folded

    def _collect(self, **kwargs: Any) -> None:
        started = time.perf_counter()
        super()._collect(**kwargs)
        self.wait_s += time.perf_counter() - started

    def _hand_over(self, folded: Any) -> None:
        super()._hand_over(folded)
        if self.serial:
            self._collect()

    def _write(self, folded: Any) -> float:
        wall, cpu = time.perf_counter(), time.thread_time()
        written_at = super()._write(folded)
        self.write_wall_s += time.perf_counter() - wall
        self.write_cpu_s += time.thread_time() - cpu
        return written_at


def overlap(root: Path, events: list[Any], serial: bool) -> None:
    settings = isolated_settings(get_settings(), root)
    producer = build_producer(settings)
    produce_events(producer, settings.events_topic, events)
    producer.close()
    consumer = Probe(settings, redis_client=redis.Redis.from_url(settings.redis_url), group="bench-overlap",
                     serial=serial)  # fmt: skip
    cpu = time.process_time()
    consumer.run(stop=lambda: consumer.applied_total >= len(events))
    wall = time.perf_counter() - consumer.first_poll
    cpu = time.process_time() - cpu
    n = len(events) / 1e6
    print(f"{'serial' if serial else 'overlapped'}: {len(events) / wall:,.0f} events/s; per event (us): process CPU "
          f"{cpu / n:.1f}, writer thread CPU {consumer.write_cpu_s / n:.1f} of its {consumer.write_wall_s / n:.1f} "
          f"wall; main thread folding {consumer.fold_s / n:.1f}, waiting for the writer {consumer.wait_s / n:.1f} "
          f"({len(consumer.sizes)} batches, median {statistics.median(consumer.sizes):,.0f} events)")  # fmt: skip
    _delete_topics(settings)


def _delete_topics(settings: Any) -> None:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    admin.delete_topics([settings.events_topic, settings.dlq_topic])
    admin.close()


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=110_300)
    parser.add_argument("--part", choices=("transaction", "overlap", "both"), default="both")
    args = parser.parse_args()
    events, source = load_events(args.events)
    print(f"data: {source}")
    with tempfile.TemporaryDirectory() as root:
        if args.part in ("transaction", "both"):
            settings = isolated_settings(get_settings(), Path(root) / "transaction")
            transaction(settings, events)
            _delete_topics(settings)
        if args.part in ("overlap", "both"):
            for n, serial in enumerate((True, False, True, False)):
                overlap(Path(root) / f"overlap{n}", events, serial)


if __name__ == "__main__":
    main()
