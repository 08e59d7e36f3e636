"""Ingest: the feature consumer against kafka-python's own ceiling, Feast's per-event push, and freshness.

    python -m bench.ingest [--events N] [--fresh-seconds S] [--naive N]

On the local stack (`adloop stack up`), with fresh topics, Redis db 5 and a temporary Feast folder:
  (a) raw: kafka-python alone drains the topic (poll, no processing): this client's ceiling;
  (b) pipeline: one FeatureConsumer process applies the same events end to end (decode, dedup,
      aggregates, offline parquet, one atomic Redis write with the online rows and offsets, commit);
  (c) freshness at a fixed rate, half of (b) and 10,000 events/s: produce (record CreateTime) -> features
      readable (after the batch's Redis transaction), p50 and p99;
  (p) the peer: quixstreams 3.28 doing a simpler version of (b)'s job on the same topic
      (bench/ingest_peer.py, in `.venv-bench` from `make bench-install`), at-least-once and exactly-once;
  (r) replay: what `adloop replay` does (read the Taobao file, build each event, send with the project's
      producer) against kafka-python alone sending the same messages encoded beforehand (same settings);
  (g) volume (`--globo N`): the first N Globo clicks replayed (paced at half of (b)) through Kafka and one
      consumer: events/s, freshness, Redis memory per user, the consumer process' RSS as it goes;
  (d) naive: one Feast `push` per event.
Prints each rate and the ratios (b)/(a), (b)/(d) and (b)/peer. Data: the Taobao slice, else synthetic events.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.partitioner.default import murmur2

from adloop.settings import PROJECT_ROOT, Settings, get_settings
from features import store
from features.aggregates import UserState, apply_user, user_features
from features.sink import FeastSink
from features.store import USER_VIEW
from streaming.consumer import FeatureConsumer
from streaming.events import Event
from streaming.producer import PRODUCER_CONFIG, build_producer, produce_events

SHARED_DATA = Path(os.environ.get("ADLOOP_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")
TAOBAO = SHARED_DATA / "taobao" / "UserBehavior_timeslice.csv"
GLOBO = SHARED_DATA / "globo" / "clicks.csv.gz"
BENCH_REDIS_DB = 5
PEER_PYTHON = PROJECT_ROOT / ".venv-bench" / "bin" / "python"  # `make bench-install`
PEER_GUARANTEES = ("at-least-once", "exactly-once")
PACE_CHUNK = 100  # messages sent back to back by the paced producer


def load_events(limit: int) -> tuple[list[Event], str]:
    if TAOBAO.exists():
        from streaming.replay import taobao

        events = []
        for event in taobao.read(TAOBAO):
            events.append(event)
            if len(events) == limit:
                break
        return events, f"Taobao slice ({len(events):,} events)"
    from streaming.simulate import Population, SimConfig

    events = list(Population(SimConfig(users=20_000, seed=1)).events(limit))
    return events, f"synthetic population ({len(events):,} events)"


def isolated_settings(base: Settings, root: Path, batch_size: int = 5000) -> Settings:
    topic = f"adloop.bench.ingest.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=base.kafka_bootstrap_servers)
    admin.create_topics([NewTopic(topic, base.event_partitions, 1), NewTopic(topic + ".dlq", 1, 1)])
    admin.close()
    settings = base.model_copy(
        update={
            "events_topic": topic,
            "dlq_topic": topic + ".dlq",
            "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}",
            "feast_data_dir": root / "feast",
            "consumer_batch_size": batch_size,
        }
    )
    redis.Redis.from_url(settings.redis_url).flushdb()
    store.apply(settings)
    return settings


def raw_drain(settings: Settings, total: int) -> float:
    """(a) events/s of a bare kafka-python consumer reading every message once."""
    consumer = KafkaConsumer(
        settings.events_topic, bootstrap_servers=settings.kafka_bootstrap_servers, group_id=f"raw-{uuid.uuid4().hex}",
        auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=5000,
    )  # fmt: skip
    seen, started = 0, None
    while seen < total:
        batch = consumer.poll(timeout_ms=500)
        if batch and started is None:
            started = time.perf_counter()
        seen += sum(len(records) for records in batch.values())
    elapsed = time.perf_counter() - started
    consumer.close()
    return total / elapsed


class TimedConsumer(FeatureConsumer):
    """Records, per applied record, the time from its CreateTime to the end of its batch's write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_poll: float | None = None
        self.lags_ms: list[float] = []
        self.applied_total = 0

    def apply(self, batch):
        if self.first_poll is None:
            self.first_poll = time.perf_counter()
        report = super().apply(batch)
        done_ms = time.time() * 1000
        self.lags_ms.extend(done_ms - r.timestamp for records in batch.values() for r in records)
        self.applied_total += report.applied
        return report


def pipeline(settings: Settings, total: int) -> tuple[float, TimedConsumer]:
    """(b) events/s of one FeatureConsumer applying `total` events already on the topic."""
    consumer = TimedConsumer(settings, redis_client=redis.Redis.from_url(settings.redis_url), group="bench-pipeline")
    consumer.run(stop=lambda: consumer.applied_total >= total)
    return total / (time.perf_counter() - consumer.first_poll), consumer


def peer(settings: Settings, total: int, guarantee: str) -> dict[str, Any]:
    """The peer (bench/ingest_peer.py: quixstreams, in its own venv and process) on the same topic; its
    changelog topics are deleted afterwards."""
    command = [str(PEER_PYTHON), "-m", "bench.ingest_peer", "--bootstrap", settings.kafka_bootstrap_servers,
               "--topic", settings.events_topic, "--redis", settings.redis_url, "--events", str(total),
               "--guarantee", guarantee]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the peer failed ({guarantee}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    admin.delete_topics([t for t in admin.list_topics() if result["group"] in t])
    admin.close()
    return result


Message = tuple[bytes, bytes, int]  # key, value, partition: encoded before the timed part


def encode_messages(events: list[Event], partitions: int) -> list[Message]:
    """Keys, JSON values and the partition kafka-python's default partitioner picks (murmur2 of the
    key), computed up front (not timed)."""
    return [(k := e.user_id.encode(), e.to_bytes(), (murmur2(k) & 0x7FFFFFFF) % partitions) for e in events]


def _paced_producer(settings: Settings, messages: list[Message], rate: float, ready: Any, go: Any, result: Any) -> None:
    """Sends pre-encoded messages at `rate` per second, in chunks of 100 (the producer lingers 20 ms
    anyway); puts the rate it achieved, first send to the end of the final flush, on `result`."""
    warnings.filterwarnings("ignore")
    producer = build_producer(settings)
    producer.partitions_for(settings.events_topic)  # metadata fetched before the clock starts
    ready.set()
    go.wait()
    started = time.perf_counter()
    for first in range(0, len(messages), PACE_CHUNK):
        wait = started + first / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        for key, value, partition in messages[first : first + PACE_CHUNK]:
            producer.send(settings.events_topic, value, key=key, partition=partition)
    producer.flush()
    result.put(len(messages) / (time.perf_counter() - started))
    producer.close()


def freshness(settings: Settings, messages: list[Message], rate: float) -> tuple[list[float], float]:
    """(c) lag from produce (the record's CreateTime) to readable, with a producer process paced at
    `rate` events/s; returns the lags and the rate the producer achieved."""
    consumer = TimedConsumer(settings, redis_client=redis.Redis.from_url(settings.redis_url), group="bench-fresh")
    stop, runner = _start_consumer(consumer)
    achieved = _run_producer(_paced_producer, (settings, messages, rate), timeout_s=600)
    deadline = time.monotonic() + 60
    while consumer.applied_total < len(messages) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    runner.join(timeout=30)
    return consumer.lags_ms, achieved


def replay_rates(settings: Settings, raw_settings: Settings, limit: int) -> tuple[float, float]:
    """(r) events/s of `adloop replay`'s path on the Taobao file (reader + `produce_events`), and of kafka-python
    sending the same messages already encoded (keys and values as bytes, the same producer settings)."""
    from itertools import islice

    from kafka import KafkaProducer

    from streaming import replay

    messages = [(e.user_id.encode(), e.to_bytes()) for e in islice(replay.read(TAOBAO, "taobao"), limit)]
    raw = KafkaProducer(bootstrap_servers=raw_settings.kafka_bootstrap_servers, **PRODUCER_CONFIG)
    raw.partitions_for(raw_settings.events_topic)
    started = time.perf_counter()
    for key, value in messages:
        raw.send(raw_settings.events_topic, value, key=key)
    raw.flush()
    raw_rate = len(messages) / (time.perf_counter() - started)
    raw.close()
    producer = build_producer(settings)
    producer.partitions_for(settings.events_topic)
    summary = produce_events(producer, settings.events_topic, islice(replay.read(TAOBAO, "taobao"), limit))
    producer.close()
    return summary.rate, raw_rate


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _globo_producer(settings: Settings, limit: int, rate: float, ready: Any, go: Any, result: Any) -> None:
    from itertools import islice

    from streaming import replay

    warnings.filterwarnings("ignore")
    producer = build_producer(settings)
    producer.partitions_for(settings.events_topic)
    ready.set()
    go.wait()
    summary = produce_events(producer, settings.events_topic, islice(replay.read(GLOBO, "globo"), limit), max_rate=rate)
    result.put((summary.count, summary.rate))
    producer.close()


class VolumeConsumer(TimedConsumer):
    """`TimedConsumer` that also samples its process' RSS after each batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rss_mb: list[tuple[int, float]] = []  # (events applied so far, RSS MB)

    def apply(self, batch):
        report = super().apply(batch)
        self.rss_mb.append((self.applied_total, _rss_mb()))
        return report


def volume(settings: Settings, limit: int, rate: float) -> dict[str, Any]:
    """(g) the first `limit` Globo clicks through a paced producer process, Kafka and one consumer."""
    client = redis.Redis.from_url(settings.redis_url)
    memory_before = client.info("memory")["used_memory"]
    consumer = VolumeConsumer(settings, redis_client=client, group="bench-volume")
    consumer.rss_mb.append((0, _rss_mb()))
    stop, runner = _start_consumer(consumer)
    sent, sent_rate = _run_producer(_globo_producer, (settings, limit, rate), timeout_s=3600)
    deadline = time.monotonic() + 120
    while consumer.applied_total < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    runner.join(timeout=60)
    elapsed = time.perf_counter() - consumer.first_poll
    state_keys = {k.decode(): k.decode().rsplit(":user:", 1)[1] for k in client.scan_iter("adloop:{*}:user:*",
                                                                                          count=10_000)}  # fmt: skip
    users = set(state_keys.values())
    sample = sorted(state_keys.items())[:: max(1, len(state_keys) // 500)]
    keys = [(state_key, consumer.layout.key(USER_VIEW, u)) for state_key, u in sample]
    per_user = [sum(client.memory_usage(k) or 0 for k in pair) for pair in keys]
    return {
        "sent": sent, "sent_rate": sent_rate, "applied": consumer.applied_total,
        "rate": consumer.applied_total / elapsed,
        "lags": consumer.lags_ms, "users": len(users), "user_bytes": statistics.mean(per_user) if per_user else 0.0,
        "memory": client.info("memory")["used_memory"] - memory_before, "rss": consumer.rss_mb,
    }  # fmt: skip


def naive(settings: Settings, events: list[Event]) -> float:
    """(d) events/s of one Feast push per event (the design this consumer avoids)."""
    sink, states = FeastSink(settings), {}
    started = time.perf_counter()
    for event in events:
        state = apply_user(states.setdefault(event.user_id, UserState()), event)
        sink.write_online(USER_VIEW, [(event.user_id, event.ts_ms, user_features(state))])
    return len(events) / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=110_300, help="events for (a) and (b)")
    parser.add_argument("--fresh-seconds", type=float, default=5.0, help="duration of each (c)")
    parser.add_argument("--naive", type=int, default=300, help="events for (d)")
    parser.add_argument("--globo", type=int, default=0, metavar="N", help="(g): replay the first N Globo clicks")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip the quixstreams peer")
    parser.add_argument("--fresh-batch", type=int, default=5000, help="max events per micro-batch in (c)")
    args = parser.parse_args()

    events, source = load_events(args.events)
    with tempfile.TemporaryDirectory() as root:
        settings = isolated_settings(get_settings(), Path(root))
        producer = build_producer(settings)
        produce_events(producer, settings.events_topic, events)
        producer.close()
        print(f"data: {source}; topic {settings.events_topic} ({settings.event_partitions} partitions)")

        raw = raw_drain(settings, len(events))
        print(f"(a) raw kafka-python drain:        {raw:10,.0f} events/s")
        full, _ = pipeline(settings, len(events))
        print(f"(b) full pipeline, one process:    {full:10,.0f} events/s")
        peers = {}
        if args.peer and PEER_PYTHON.exists():
            for guarantee in PEER_GUARANTEES:
                result = peer(settings, len(events), guarantee)
                peers[guarantee] = result["rate"]
                print(f"(p) peer quixstreams 3.28, {guarantee + ':':14s} {peers[guarantee]:10,.0f} events/s  "
                      f"({result['users']:,} user hashes)")  # fmt: skip
        elif args.peer:
            print(f"(p) peer: skipped, {PEER_PYTHON} missing (`make bench-install`)")

        fresh_events = [e.model_copy(update={"event_id": f"fresh-{i}"}) for i, e in enumerate(events)]
        made = [settings]
        for n, rate in enumerate((round(full / 2, -2), 10_000)):
            fresh_settings = isolated_settings(get_settings(), Path(root) / f"fresh{n}", args.fresh_batch)
            made.append(fresh_settings)
            fresh = encode_messages(fresh_events[: int(rate * args.fresh_seconds)], settings.event_partitions)
            lags, achieved = freshness(fresh_settings, fresh, rate)
            label = "half of (b)" if n == 0 else "fixed"
            print(
                f"(c) freshness at {rate:,.0f} events/s ({label}; achieved {achieved:,.0f}/s, {len(lags):,} events, "
                f"batches of up to {args.fresh_batch:,}): "
                f"p50 {statistics.median(lags):,.0f} ms, p99 {percentile(lags, 0.99):,.0f} ms"
            )

        if TAOBAO.exists():
            replay_settings = isolated_settings(get_settings(), Path(root) / "replay")
            raw_send_settings = isolated_settings(get_settings(), Path(root) / "rawsend")
            made += [replay_settings, raw_send_settings]
            replayed, raw_send = replay_rates(replay_settings, raw_send_settings, len(events))
            print(
                f"(r) `adloop replay` path: {replayed:10,.0f} events/s; kafka-python sending the same messages "
                f"pre-encoded: {raw_send:,.0f}/s; ratio {replayed / raw_send:.2f}"
            )

        if args.globo and GLOBO.exists():
            globo_settings = isolated_settings(get_settings(), Path(root) / "globo")
            made.append(globo_settings)
            rate = round(full / 2, -2)
            result = volume(globo_settings, args.globo, rate)
            rss = result["rss"]
            middle = rss[len(rss) // 2]
            print(
                f"(g) Globo, first {result['sent']:,} clicks paced at {rate:,.0f}/s "
                f"(sent at {result['sent_rate']:,.0f}/s): "
                f"applied {result['applied']:,} at {result['rate']:,.0f} events/s; freshness p50 "
                f"{statistics.median(result['lags']):,.0f} ms, p99 {percentile(result['lags'], 0.99):,.0f} ms; "
                f"{result['users']:,} users, Redis +{result['memory'] / 2**20:,.0f} MB in all "
                f"({result['memory'] / max(1, result['users']):,.0f} B per user incl. seen ids), "
                f"state + online row {result['user_bytes']:,.0f} B per user (MEMORY USAGE, sampled); consumer RSS "
                f"{rss[0][1]:,.0f} MB at start, {rss[1][1]:,.0f} MB after the first batch, {middle[1]:,.0f} MB at "
                f"{middle[0]:,} events, {rss[-1][1]:,.0f} MB at the end"
            )
        elif args.globo:
            print(f"(g) Globo: skipped, {GLOBO} missing")

        naive_settings = isolated_settings(get_settings(), Path(root) / "naive")
        slow = naive(naive_settings, events[: args.naive])
        print(f"(d) naive, one Feast push/event:   {slow:10,.0f} events/s  ({args.naive} events)")
        print(f"ratios: (b)/(a) = {full / raw:.2f}   (b)/(d) = {full / slow:.1f}x")
        if peers:
            print("        " + "   ".join(f"(b)/peer {g} = {full / r:.2f}x" for g, r in peers.items()))
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
        everything = (*made, naive_settings)
        admin.delete_topics([t for s in everything for t in (s.events_topic, s.dlq_topic)])
        admin.close()


def _start_consumer(consumer: Any) -> tuple[threading.Event, threading.Thread]:
    """Run `consumer` in a thread until the returned event is set; returns once it holds partitions."""
    stop = threading.Event()
    runner = threading.Thread(target=consumer.run, kwargs={"stop": stop.is_set}, daemon=True)
    runner.start()
    while not consumer.consumer.assignment():
        time.sleep(0.05)
    return stop, runner


def _run_producer(target: Any, args: tuple, *, timeout_s: float) -> Any:
    """`target(*args, ready, go, result)` in a spawned process, started once it is ready; its result."""
    context = multiprocessing.get_context("spawn")
    ready, go, result = context.Event(), context.Event(), context.Queue()
    producer = context.Process(target=target, args=(*args, ready, go, result))
    producer.start()
    ready.wait(timeout=120)
    go.set()
    out = result.get(timeout=timeout_s)
    producer.join()
    return out


if __name__ == "__main__":
    main()
