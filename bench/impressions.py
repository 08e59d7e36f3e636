"""CPU that impression logging costs the serving process: main's path against this one, on the local Kafka.

    .venv/bin/python -m bench.impressions [--rate 1000] [--seconds 5] [--rounds 3] [--partitions N]

Both paths run in this process through `ImpressionLogger`, whose thread drains the buffer every
100 ms, fed as the API feeds it: one `log()` of 2 records per request at rate / 2 requests per second,
records shaped as `serving.impressions.impression_records` builds them (2,000 users, context of 4 keys).
OLD is main's drain (56502e7, reproduced here): a pydantic `Event` per record, `Event.to_bytes`, `send`
with two callbacks per record and main's producer settings, in this branch's loop (`log`, the 100 ms
drain); NEW is `serving.impressions` as it is. Rounds alternate OLD and NEW, each with a fresh
producer, on one fresh topic (`--partitions`, default `ADLOOP_EVENT_PARTITIONS`: 6; loopback; deleted
afterwards). CPU is read per thread from /proc (schedstat, ns): the logger thread, kafka-python's
network thread, and the whole process (which includes the feeding loop, the same for both). Prints
medians over rounds of CPU per record, the logger thread's CPU per drain (median, p99 over all
drains), what was delivered, the ratios new / old, and the CPU of the encoding alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
import warnings
from typing import Any

from adloop.settings import Settings, get_settings
from serving import impression_records, impressions
from serving.impression_records import to_event
from serving.impressions import ImpressionLogger


class Timed:
    """Records the logger thread's CPU for each drain (seconds)."""

    drains: list[float]

    def _drain(self) -> bool:
        started = time.thread_time()
        try:
            return super()._drain()  # type: ignore[misc]
        finally:
            self.drains.append(time.thread_time() - started)


class NewLogger(Timed, ImpressionLogger):
    pass


class MainLogger(Timed, ImpressionLogger):
    """`ImpressionLogger` with main's drain (56502e7): an Event per record, callbacks per record."""

    def _send_batch(self) -> bool:
        with self._lock:
            batch = [self._buffer.popleft() for _ in range(min(impressions.BATCH, len(self._buffer)))]
        for i, record in enumerate(batch):
            try:
                event = to_event(record)
            except Exception:
                self._count("lost", 1)
                continue
            try:
                future = self._producer.send(self.topic, key=event.user_id.encode(), value=event.to_bytes())
            except Exception as error:
                self.last_error, self._healthy = f"send: {error}", False
                with self._lock:
                    self._buffer.extendleft(reversed(batch[i:]))
                return False
            future.add_callback(self._sent)
            future.add_errback(self._failed)
        return True

    def _sent(self, _metadata) -> None:
        self._healthy = True
        self._count("sent", 1)

    def _failed(self, error: Exception) -> None:
        self.last_error, self._healthy = f"delivery: {error}", False
        self._count("lost", 1)


def main_encode(record: dict[str, Any]) -> tuple[bytes, bytes]:
    event = to_event(record)
    return event.user_id.encode(), event.to_bytes()


def main_producer(bootstrap_servers: str):
    """`serving.impressions.kafka_producer`'s settings."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=50, bootstrap_timeout_ms=3000,
                         max_block_ms=2000, request_timeout_ms=5000, delivery_timeout_ms=30_000, retries=5)  # fmt: skip


def requests(n: int, seed: int) -> list[list[dict[str, Any]]]:
    """`n` requests' impression records, 2 ads each, as `impression_records` builds them."""
    out = []
    for i in range(n):
        request_id, user = uuid.uuid4().hex, f"user-{(i * 7919 + seed) % 2000:05d}"
        context = {"device": "mobile" if i % 3 else "desktop", "country": "DE", "format": "native"}
        out.append(
            [
                {"event_id": uuid.uuid4().hex, "user_id": user, "ad_id": f"ad-{(i * 31 + rank) % 10_000:05d}",
                 "campaign_id": f"camp-{(i + rank) % 300:03d}", "category": f"cat-{(i + rank) % 40}",
                 "request_id": request_id, "slot_id": "feed", "position": rank, "model_version": "tt-lgbm-20261125",
                 "arm": "targeted" if i % 10 else "control", "propensity": 0.9 if rank == 1 else 0.05,
                 "context": {**context, "advertiser_id": f"adv-{(i + rank) % 50:02d}"}, "ts": int(time.time() * 1000)}
                for rank in (1, 2)
            ]
        )  # fmt: skip
    return out


def cpu_ns(native_id: int | None = None) -> int:
    """CPU time on record for one thread of this process (or the whole process), in ns."""
    if native_id is None:
        return time.process_time_ns()
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0])


def kafka_thread() -> threading.Thread:
    alive = [t for t in threading.enumerate() if t.name.startswith("kafka-python-producer")]
    return max(alive, key=lambda t: int(t.name.split("-")[3]))  # the newest producer's


def one_round(cls, factory, topic: str, *, rate: int, seconds: float, seed: int) -> dict[str, Any]:
    logger = cls(topic=topic, producer_factory=factory, buffer_size=100_000)
    logger.drains = []
    logger.start()
    logger.log(requests(1, seed)[0])  # connect and fetch the topic's metadata before timing
    deadline = time.monotonic() + 20
    while logger.counts["sent"] < 2 and time.monotonic() < deadline:
        logger.flush(timeout=1)
    if logger.counts["sent"] < 2:
        raise SystemExit(f"Kafka did not take the warm-up records: {logger.last_error}")
    logger.drains.clear()
    batches = requests(int(rate / 2 * seconds), seed)
    threads = {"logger": logger._thread.native_id, "kafka": kafka_thread().native_id}
    before = {name: cpu_ns(tid) for name, tid in threads.items()} | {"process": cpu_ns()}
    sent_before, started = logger.counts["sent"], time.perf_counter()
    for i, records in enumerate(batches):  # open loop: request i is due at i / (rate / 2) s
        delay = started + i * 2 / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        logger.log(records)
    logger.flush(timeout=30)
    n = 2 * len(batches)
    deadline = time.monotonic() + 10
    while logger.counts["sent"] - sent_before < n and time.monotonic() < deadline:
        time.sleep(0.01)  # the last deliveries are counted by the logger's next pass
    after = {name: cpu_ns(tid) for name, tid in threads.items()} | {"process": cpu_ns()}
    result = {name: (after[name] - before[name]) / n / 1000 for name in after}  # us per record
    failed = logger.counts["lost"] + logger.counts["dead_lettered"]
    result |= {"sent": logger.counts["sent"] - sent_before, "n": n, "failed": failed}
    result["drains"] = list(logger.drains)
    logger.close(timeout=5)
    return result


def encoding_us(encode, records: list[dict[str, Any]], repeat: int = 5) -> float:
    """Median over `repeat` passes of the CPU per record of `encode` alone (this thread, no Kafka)."""
    passes = []
    for _ in range(repeat):
        started = time.thread_time()
        for record in records:
            encode(record)
        passes.append((time.thread_time() - started) / len(records) * 1e6)
    return statistics.median(passes)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="records per second (2 per request)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="per path")
    parser.add_argument("--partitions", type=int, default=None, help="of the topic (default: as deployed)")
    args = parser.parse_args()
    settings = get_settings()
    partitions = args.partitions or settings.event_partitions
    if not 10 <= args.rate <= 20_000 or not 0.5 <= args.seconds <= 60 or not 1 <= args.rounds <= 10:
        parser.error("bounded: --rate 10..20000, --seconds 0.5..60, --rounds 1..10")

    from kafka.admin import KafkaAdminClient, NewTopic

    servers = settings.kafka_bootstrap_servers
    if any(s.rsplit(":", 1)[0].strip("[]") not in ("127.0.0.1", "localhost", "::1") for s in servers.split(",")):
        parser.error(f"runs against the local broker only, not {servers}")
    paths = {
        "old": (MainLogger, lambda: main_producer(servers)),
        "new": (NewLogger, lambda: impressions.kafka_producer(Settings(kafka_bootstrap_servers=servers))),
    }
    topic = f"adloop.bench.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    try:
        for r in range(args.rounds):
            for name, (cls, factory) in paths.items():
                results[name].append(one_round(cls, factory, topic, rate=args.rate, seconds=args.seconds, seed=r))
    finally:
        admin.delete_topics([topic])
        admin.close()

    records = [r for batch in requests(2000, 0) for r in batch]
    encoding = {
        "old": encoding_us(main_encode, records),
        "new": encoding_us(impression_records.encode, records),
    }
    load = os.getloadavg()[0]
    print(f"{args.rate:,} records/s ({args.rate // 2:,} requests x 2 ads), {args.seconds:g} s a round, "
          f"{args.rounds} rounds a path alternating, {partitions} partitions, "
          f"load {load:.2f} at the end")  # fmt: skip
    print("         CPU us per record (median of rounds)       logger CPU per drain ms      delivered")
    print("         logger  kafka thread  both   process          median    p99")
    summary = {}
    for name, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in ("logger", "kafka", "process")}
        med["both"] = med["logger"] + med["kafka"]
        drains = [d * 1000 for r in rounds for d in r["drains"] if d > 0]
        med["drain_p50"], med["drain_p99"] = statistics.median(drains), p99(drains)
        sent, n, failed = sum(r["sent"] for r in rounds), sum(r["n"] for r in rounds), rounds[-1]["failed"]
        summary[name] = med
        cpu = f"{med['logger']:7.1f} {med['kafka']:12.1f} {med['both']:6.1f} {med['process']:8.1f}"
        drain = f"{med['drain_p50']:6.2f} {med['drain_p99']:6.2f}"
        print(f"  {name:5} {cpu}          {drain}      {sent:,}/{n:,} failed {failed}")
    old, new = summary["old"], summary["new"]
    ratios = "  ".join(f"{k} {new[k] / old[k]:.2f}" for k in ("logger", "kafka", "both", "process", "drain_p50"))
    print(f"  new / old: {ratios}")
    print(f"  encoding alone, us per record: old (to_event + to_bytes) {encoding['old']:.1f}, "
          f"new (encode) {encoding['new']:.1f}, new / old {encoding['new'] / encoding['old']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
