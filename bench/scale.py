"""Scale: the feature consumer with 1 and 2 processes on standalone Redis and on a 3-master Redis Cluster.

    python -m bench.scale [--events 100000] [--processes 1,2] [--repeats 2] [--skip-cluster] [--skip-serve]
                          [--serve-seconds 5] [--serve-rates 100,200,400] [--budget-s 900]

(`--repeats 0`: no consumer run, only the select sweeps.)

On the local stack (`adloop stack up`), reading the Globo clicks through the project's replay reader
(`$ADLOOP_SHARED_DATA/globo/clicks.csv.gz`):
- per topology (the stack's standalone Redis, database 7; a 3-master Redis Cluster this bench starts on
  loopback ports 17700+ and stops afterwards), per process count and repeat: a fresh 12-partition topic
  (adloop.runs.isolated.isolated_settings for the Redis database and Feast folder), the first N clicks
  produced to it *before* any consumer starts (so the consumers are timed, not the producer), Redis
  emptied, then N consumer subprocesses in one group (`python -m bench.scale --as-consumer GROUP`: what
  `adloop consume --idle-exit 10` runs, in a group of the run's own, since other sessions' consumers on a
  shared broker join `adloop-features` and each of their joins would pause this run's for a rebalance);
- events/s: events applied (the applied offsets stored in Redis, polled every 50 ms) from the moment every
  process holds partitions (the group's members, from the broker) and has stored a batch since (a
  process' first batch carries one-off costs) to the last one applied;
- CPU per event over that window: Redis (INFO cpu, summed over the nodes), the consumer processes
  (/proc), the Kafka broker (/proc, when found) and the whole machine (/proc/stat): what is left of
  `cores x window` is waiting;
- after the replay: Redis used_memory growth and DBSIZE summed over the nodes, per distinct user and
  per event, and one user's state + Feast row (MEMORY USAGE of both keys, sampled);
- select capacity with 1 and 2 API workers: `python -m bench.serve --targets select` (one short rate
  sweep) as a subprocess, parsed, on both topologies (on the cluster its rows are seeded and read there);
  "not measured: <reason>" where it fails.
Everything is bounded (events, repeats, per-run and whole-bench time limits) and cleans up after itself.

The standalone server is the stack's, shared with whatever else runs: its CPU and memory growth include
other clients' work (the cluster's are this bench's alone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import redis

from adloop.settings import PROJECT_ROOT, Settings, get_settings
from bench.serve import tree_cpu_s

SHARED_DATA = Path(os.environ.get("ADLOOP_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")
GLOBO = SHARED_DATA / "globo" / "clicks.csv.gz"
PARTITIONS = 12
BENCH_REDIS_DB = 7  # standalone: emptied before each run and at the end
CLUSTER_FIRST_PORT = 17700
IDLE_EXIT_S = 10.0  # a rebalance on a loaded machine polls nothing for seconds: a shorter limit ended a member mid-run
MEMORY_SAMPLES = 200  # users whose two keys MEMORY USAGE measures


@dataclass
class Run:
    """One consumer run: N processes over one freshly produced topic."""

    topology: str
    processes: int
    events: int  # applied in the measured window
    window_s: float
    consumer_cpu_s: float
    redis_cpu_s: float
    kafka_cpu_s: float | None
    machine_busy_s: float  # all processes of the machine, in core-seconds
    memory_bytes: int  # used_memory growth, all nodes, whole run
    keys: int
    users: int
    state_row_bytes: float  # one user's state + Feast row (MEMORY USAGE, mean of a sample)
    total_events: int
    produce_rate: float
    window: str = "steady"  # or "from the first batch": the group was not seen steady before the end

    @property
    def rate(self) -> float:
        return self.events / self.window_s if self.window_s > 0 else 0.0


@dataclass
class Serve:
    topology: str
    workers: int
    capacity: float | None = None
    rows: dict[float, dict[str, float]] = field(default_factory=dict)
    not_measured: str | None = None


# --- pure parts (tests/bench/test_scale.py) ------------------------------------------------


def parse_serve(text: str) -> tuple[float | None, dict[float, dict[str, float]]]:
    """bench.serve's output -> (select's capacity or None, rate -> {p50, p99, achieved, cpu_ms, errors})."""
    rows: dict[float, dict[str, float]] = {}
    capacity = None
    in_capacity = False
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("select ") and len(parts) == 9:
            _, rate, _sent, _ok, errors, p50, p99, achieved, cpu = parts
            rows[float(rate)] = {"errors": float(errors), "p50": _num(p50), "p99": _num(p99),
                                 "achieved": float(achieved), "cpu_ms": float(cpu)}  # fmt: skip
        elif line.startswith("capacity"):
            in_capacity = True
        elif in_capacity and parts and parts[0] == "select":
            capacity = None if parts[1] == "-" else float(parts[1].removesuffix("/s"))
            in_capacity = False
    return capacity, rows


def _num(text: str) -> float:
    return float("nan") if text == "-" else float(text)


def median_of(runs: list[Run], attribute: str) -> float:
    values = [getattr(r, attribute) for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def per_event_us(runs: list[Run], attribute: str) -> float:
    """Median over the runs of a CPU figure per event, in microseconds (NaN where none measured it)."""
    values = [getattr(r, attribute) / r.events * 1e6 for r in runs if getattr(r, attribute) is not None and r.events]
    return statistics.median(values) if values else float("nan")


def table(runs: list[Run]) -> list[str]:
    """Markdown table: per topology and process count, medians over the repeats and the ratio to one process."""
    lines = [
        "| topology | processes | runs | events/s (median) | vs 1 process | consumer CPU us/event | Redis CPU us/event "
        "| Kafka CPU us/event | machine busy (cores) | Redis B/user | Redis B/event | keys/user | state+row B/user |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for topology in dict.fromkeys(r.topology for r in runs):
        mine = [r for r in runs if r.topology == topology]
        base = None
        for processes in sorted({r.processes for r in mine}):
            group = [r for r in mine if r.processes == processes]
            rate = median_of(group, "rate")
            base = rate if processes == min(r.processes for r in mine) else base
            per = {name: per_event_us(group, name) for name in ("consumer_cpu_s", "redis_cpu_s", "kafka_cpu_s")}
            busy = statistics.median(r.machine_busy_s / r.window_s for r in group)
            memory = statistics.median(r.memory_bytes for r in group)
            users = group[0].users
            keys = statistics.median(r.keys for r in group)
            lines.append(
                f"| {topology} | {processes} | {len(group)} | {rate:,.0f} | {rate / base:.2f}x "
                f"| {per['consumer_cpu_s']:,.0f} | {per['redis_cpu_s']:,.0f} | {_fmt(per['kafka_cpu_s'])} "
                f"| {busy:.2f} | {memory / users:,.0f} | {memory / group[0].total_events:,.0f} "
                f"| {keys / users:.2f} | {median_of(group, 'state_row_bytes'):,.0f} |"
            )
    return lines


def serve_table(results: list[Serve]) -> list[str]:
    lines = ["| topology | API workers | select capacity (p99 < 20 ms, no errors) | p99 ms per rate | CPU ms/req |",
             "| --- | ---: | ---: | --- | --- |"]  # fmt: skip
    for s in results:
        if s.not_measured:
            lines.append(f"| {s.topology} | {s.workers} | not measured: {s.not_measured} | | |")
            continue
        p99 = ", ".join(f"{r:.0f}/s: {v['p99']:.1f}" for r, v in sorted(s.rows.items()))
        cpu = ", ".join(f"{v['cpu_ms']:.2f}" for _, v in sorted(s.rows.items()))
        cap = "none of the rates run" if s.capacity is None else f"{s.capacity:,.0f}/s"
        lines.append(f"| {s.topology} | {s.workers} | {cap} | {p99} | {cpu} |")
    return lines


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"  # NaN: not measured


# --- measurement ---------------------------------------------------------------------------


def load_globo(limit: int) -> tuple[list[tuple[str, bytes]], int]:
    """The first `limit` Globo clicks as (key, encoded value), and their distinct users."""
    from streaming import replay

    messages = [(e.user_id, e.to_bytes()) for e in islice(replay.read(GLOBO, "globo"), limit)]
    return messages, len({k for k, _ in messages})


def produce(settings: Settings, messages: list[tuple[str, bytes]]) -> float:
    """Send the pre-encoded messages with the project's producer (acks=all, gzip); returns messages/s."""
    from streaming.producer import build_producer

    producer = build_producer(settings)
    started = time.perf_counter()
    for key, value in messages:
        producer.send(settings.events_topic, key=key, value=value)
    producer.flush(timeout=120)
    rate = len(messages) / (time.perf_counter() - started)
    producer.close()
    return rate


@contextmanager
def fresh_topic(settings: Settings) -> Iterator[Settings]:
    from kafka.admin import NewTopic

    from streaming import kafka_clients

    topic = f"adloop.bench.scale.{uuid.uuid4().hex[:10]}"
    admin = kafka_clients.admin(settings)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1), NewTopic(topic + ".dlq", 1, 1)])
    try:
        yield settings.model_copy(update={"events_topic": topic, "dlq_topic": topic + ".dlq"})
    finally:
        admin.delete_topics([topic, topic + ".dlq"])
        admin.close()


def node_clients(settings: Settings) -> list[redis.Redis]:
    """One plain client per node (INFO and DBSIZE are per node): the cluster's masters, or the standalone server."""
    from features.redis_client import cluster_nodes, connection_kwargs, is_cluster

    if is_cluster(settings):
        return [redis.Redis(host=h, port=p, **connection_kwargs(settings)) for h, p in cluster_nodes(settings)]
    return [redis.Redis(**connection_kwargs(settings))]


def redis_totals(nodes: list[redis.Redis]) -> tuple[float, int, int]:
    """(CPU seconds, used_memory bytes, keys in the database) summed over the nodes."""
    cpu = memory = keys = 0
    for node in nodes:
        info = node.info("cpu")
        cpu += info["used_cpu_user"] + info["used_cpu_sys"]
        memory += node.info("memory")["used_memory"]
        keys += node.dbsize()
    return cpu, memory, keys


def machine_busy_s() -> float:
    """Core-seconds the whole machine has spent not idle (all users), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def kafka_pid() -> int | None:
    """The local broker's JVM (main class kafka.Kafka), if it runs on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"kafka.Kafka" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def consumer_env(settings: Settings) -> dict[str, str]:
    """The environment of an `adloop consume` subprocess on these settings (this checkout's code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADLOOP_") and "PROMETHEUS" not in k.upper()}
    env.update({
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONWARNINGS": "ignore",
        "ADLOOP_EVENTS_TOPIC": settings.events_topic,
        "ADLOOP_DLQ_TOPIC": settings.dlq_topic,
        "ADLOOP_EVENT_PARTITIONS": str(PARTITIONS),
        "ADLOOP_REDIS_URL": settings.redis_url,
        "ADLOOP_REDIS_CLUSTER_NODES": settings.redis_cluster_nodes or "",
        "ADLOOP_FEAST_DATA_DIR": str(settings.feast_data_dir),
        "ADLOOP_CONSUMER_BATCH_SIZE": str(settings.consumer_batch_size),
        "ADLOOP_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
    })  # fmt: skip
    return env


def assignments(admin: Any, group_id: str, topic: str) -> list[set[int]] | None:
    """Each member's partitions of `topic`, once the group is stable (None before: still rebalancing)."""
    try:
        described = admin.describe_groups([group_id])
    except Exception:  # a group still forming may not describe yet
        return None
    group = described.get(group_id, {}) if isinstance(described, dict) else {}
    if group.get("group_state") != "Stable":
        return None
    held = []
    for member in group.get("members", []):
        assigned = (member.get("member_assignment") or {}).get("assigned_partitions", [])
        held.append({p for a in assigned if a.get("topic") == topic for p in a.get("partitions", [])})
    return [h for h in held if h]


def consume(settings: Settings, processes: int, total: int, timeout_s: float, folder: Path) -> dict[str, Any]:
    """N `adloop consume` subprocesses over the (already produced) topic, until `total` events are applied."""
    from features.redis_client import redis_client
    from streaming import kafka_clients
    from streaming.state_store import StateStore

    nodes = node_clients(settings)
    broker = kafka_pid()
    admin = kafka_clients.admin(settings)
    env = consumer_env(settings)
    logs = [(folder / f"consumer-{i}.log").open("w") for i in range(processes)]
    group = f"adloop-bench-scale-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "bench.scale", "--as-consumer", group]
    procs = [subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
             for log in logs]  # fmt: skip
    store = StateStore(redis_client(settings), group=group, topic=settings.events_topic)
    deadline = time.monotonic() + timeout_s
    start: dict[str, Any] | None = None
    first: dict[str, Any] | None = None  # when the first batch was stored (the fallback window's start)
    # the members' partitions and the stored offsets when the group was first seen stable: a process' first
    # batch carries its one-off costs (first parquet file, first script load...), so the window opens
    # once each process has stored one
    stable: tuple[list[set[int]], dict[int, int]] | None = None
    applied = 0

    def snapshot() -> dict[str, Any]:
        redis_cpu, _, _ = redis_totals(nodes)
        return {"t": time.perf_counter(), "applied": applied, "redis": redis_cpu, "machine": machine_busy_s(),
                "consumers": sum(tree_cpu_s(p.pid) for p in procs),
                "kafka": tree_cpu_s(broker) if broker else None}  # fmt: skip

    try:
        while applied < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{applied:,} of {total:,} events applied within {timeout_s:.0f} s")
            dead = [p.returncode for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a consumer exited ({dead}): " + (folder / "consumer-0.log").read_text()[-2000:])
            offsets = store.applied_offsets(range(PARTITIONS))
            applied = sum(o + 1 for o in offsets.values())
            if first is None and applied:
                first = snapshot()
            if stable is None and (held := assignments(admin, group, settings.events_topic)) and len(held) >= processes:
                stable = (held, offsets)
            if (
                start is None
                and stable is not None
                and all(any(offsets.get(p, -1) > stable[1].get(p, -1) for p in parts) for parts in stable[0])
            ):
                start = snapshot()  # every process holds partitions and has stored a batch since: the window opens
            time.sleep(0.05)
        end = snapshot()
        window = "steady"
        if start is None or start["applied"] >= total:  # not seen before the end: from the first batch stored
            start, window = first, "from the first batch"
        for p in procs:
            p.wait(timeout=60 + IDLE_EXIT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        for log in logs:
            log.close()
        try:
            admin.delete_groups([group])
        except Exception as error:  # the broker keeps an empty group a while: only tidiness is lost
            print(f"  (consumer group {group} not deleted: {error})")
        admin.close()
    return {
        "events": end["applied"] - start["applied"],
        "window_s": end["t"] - start["t"],
        "consumer_cpu_s": end["consumers"] - start["consumers"],
        "redis_cpu_s": end["redis"] - start["redis"],
        "kafka_cpu_s": None if broker is None else end["kafka"] - start["kafka"],
        "machine_busy_s": end["machine"] - start["machine"],
        "window": window,
    }


def user_bytes(settings: Settings, client: Any, users: list[str]) -> float:
    """Mean MEMORY USAGE of a user's state key plus their Feast row, over a sample of the users."""
    from kafka.partitioner.default import murmur2

    from features.online import FeastLayout
    from features.store import USER_VIEW
    from streaming.state_store import StateStore

    layout = FeastLayout.from_settings(settings)
    store = StateStore(client, group="", topic=settings.events_topic)  # user keys do not depend on the group
    sample = users[:: max(1, len(users) // MEMORY_SAMPLES)]
    sizes = []
    for user in sample:
        partition = (murmur2(user.encode()) & 0x7FFFFFFF) % PARTITIONS  # kafka-python's default partitioner
        state = client.memory_usage(store.user_key(partition, user)) or 0
        row = client.memory_usage(layout.key(USER_VIEW, user)) or 0
        if state and row:
            sizes.append(state + row)
    return statistics.mean(sizes) if sizes else float("nan")


def run_topology(name: str, base: Settings, folder: Path, args: Any, messages: list[tuple[str, bytes]],
                 users: list[str], deadline: float) -> list[Run]:  # fmt: skip
    from adloop.runs.isolated import isolated_settings
    from features.redis_client import redis_client

    runs: list[Run] = []
    db = 0 if base.redis_cluster_nodes else BENCH_REDIS_DB
    with isolated_settings(base, folder, redis_db=db, prefix="adloop.bench.scale", partitions=PARTITIONS,
                           empty_after=True, event_partitions=PARTITIONS) as isolated:  # fmt: skip
        client = redis_client(isolated)
        nodes = node_clients(isolated)
        for repeat in range(args.repeats):
            for processes in args.processes:
                if time.monotonic() > deadline:
                    print(f"  {name}: time budget spent, {processes} process(es) repeat {repeat + 1} skipped")
                    continue
                with fresh_topic(isolated) as settings:
                    client.flushdb()
                    produced = produce(settings, messages)
                    time.sleep(1.0)  # let the memory figure settle after the flush
                    _, memory0, _ = redis_totals(nodes)
                    logs = folder / f"{name}-{processes}-{repeat}"
                    logs.mkdir()
                    try:
                        timing = consume(settings, processes, len(messages), min(args.run_timeout_s,
                                         deadline - time.monotonic()), logs)  # fmt: skip
                    except (TimeoutError, RuntimeError) as error:  # reported; the other runs still count
                        tail = (logs / "consumer-0.log").read_text()[-600:]
                        print(f"  {name}, {processes} process(es), run {repeat + 1}: FAILED ({error}); "
                              f"consumer 0 log ends: {tail}", flush=True)  # fmt: skip
                        continue
                    _, memory1, keys = redis_totals(nodes)
                    run = Run(topology=name, processes=processes, memory_bytes=memory1 - memory0, keys=keys,
                              users=len(users), state_row_bytes=user_bytes(settings, client, users),
                              total_events=len(messages), produce_rate=produced, **timing)  # fmt: skip
                    runs.append(run)
                    per_node = f" (per node {' / '.join(f'{n.dbsize():,}' for n in nodes)})" if len(nodes) > 1 else ""
                    print(f"  {name}, {processes} process(es), run {repeat + 1}: {run.rate:,.0f} events/s "
                          f"({run.events:,} events in {run.window_s:.1f} s, window {run.window}; "
                          f"produced beforehand at {produced:,.0f}/s); "
                          f"CPU per event: consumers {run.consumer_cpu_s / run.events * 1e6:,.0f} us, Redis "
                          f"{run.redis_cpu_s / run.events * 1e6:,.0f} us, Kafka "
                          f"{_fmt((run.kafka_cpu_s or float('nan')) / run.events * 1e6)} us; machine busy "
                          f"{run.machine_busy_s / run.window_s:.2f} of {os.cpu_count()} cores; Redis "
                          f"+{run.memory_bytes / 2**20:,.1f} MB, {keys:,} keys{per_node}", flush=True)  # fmt: skip
                    shutil.rmtree(isolated.feast_data_dir / "offline", ignore_errors=True)  # parquet: disk only
        client.flushdb()
    return runs


def serve(topology: str, workers: int, args: Any, cluster_nodes: str | None, deadline: float) -> Serve:
    """One short `bench.serve --targets select` sweep, parsed and printed; its failure is reported, not raised."""
    result = _serve(topology, workers, args, cluster_nodes, deadline)
    print(f"  select, {topology}, {workers} API worker(s): " + serve_table([result])[-1], flush=True)
    return result


def _serve(topology: str, workers: int, args: Any, cluster_nodes: str | None, deadline: float) -> Serve:
    result = Serve(topology, workers)
    budget = deadline - time.monotonic()
    if budget < 120:
        result.not_measured = "the bench's time budget was spent"
        return result
    env = {k: v for k, v in os.environ.items() if k != "ADLOOP_REDIS_CLUSTER_NODES"}
    env["PYTHONWARNINGS"] = "ignore"
    if cluster_nodes:
        env["ADLOOP_REDIS_CLUSTER_NODES"] = cluster_nodes
        # No standalone server at that address (port 9: nothing listens), so that any client still opened on
        # the standalone URL (seeding or serving) fails instead of giving a standalone figure labelled cluster;
        # the cluster takes only the scheme and credentials of this URL.
        env["ADLOOP_REDIS_URL"] = "redis://127.0.0.1:9/0"
    command = [sys.executable, "-m", "bench.serve", "--targets", "select", "--workers", str(workers),
               "--seconds", str(args.serve_seconds), "--rates", args.serve_rates,
               *(["--own-cluster"] if cluster_nodes else [])]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=min(600, budget))  # fmt: skip
    except subprocess.TimeoutExpired:
        result.not_measured = f"bench.serve did not finish within {min(600, budget):.0f} s"
        return result
    if done.returncode != 0:
        last = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        result.not_measured = f"bench.serve failed: {last[-1][:300] if last else done.returncode}"
        return result
    result.capacity, result.rows = parse_serve(done.stdout)
    if not result.rows:
        result.not_measured = "bench.serve printed no select row"
    return result


@contextmanager
def local_cluster(folder: Path) -> Iterator[str]:
    """A 3-master Redis Cluster on loopback (adloop.stack.redis_cluster), stopped afterwards."""
    from adloop.stack.redis_cluster import free_cluster_ports, start_cluster, stop_cluster

    ports = free_cluster_ports(3, CLUSTER_FIRST_PORT)
    nodes = ",".join(f"127.0.0.1:{p}" for p in ports)
    settings = Settings(stack_dir=folder / "stack", redis_cluster_nodes=nodes)
    try:
        start_cluster(settings)
        yield nodes
    finally:
        stop_cluster(settings)


def consumer_main(group: str) -> None:
    """One consumer process of a run: what `adloop consume --idle-exit 10` runs, in a group of the run's own
    (other sessions' `adloop consume` on the shared broker join `adloop-features`, and each of their joins
    would pause this run's members for a rebalance); no /metrics server."""
    from features.redis_client import redis_client
    from streaming.consumer import FeatureConsumer

    settings = get_settings()
    report = FeatureConsumer(settings, redis_client=redis_client(settings), group=group).run(idle_exit_s=IDLE_EXIT_S)
    dead = sum(report.dead_lettered.values())
    print(f"applied {report.applied}, duplicates {report.duplicates}, dead-lettered {dead}")


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="Globo clicks replayed per run")
    parser.add_argument("--processes", default="1,2", help="consumer process counts")
    parser.add_argument("--repeats", type=int, default=2, help="runs per topology and process count")
    parser.add_argument("--skip-cluster", action="store_true", help="standalone Redis only")
    parser.add_argument("--skip-serve", action="store_true", help="no select capacity")
    parser.add_argument("--serve-seconds", type=float, default=5.0)
    parser.add_argument("--serve-rates", default="100,200,400")
    parser.add_argument("--serve-workers", default="1,2")
    parser.add_argument("--run-timeout-s", type=float, default=180.0, help="limit of one consumer run")
    parser.add_argument("--budget-s", type=float, default=900.0, help="limit of the whole bench")
    parser.add_argument("--as-consumer", metavar="GROUP", help=argparse.SUPPRESS)  # a run's consumer process
    args = parser.parse_args()
    if args.as_consumer:
        consumer_main(args.as_consumer)
        return
    args.processes = [int(p) for p in args.processes.split(",")]
    assert 0 < args.events <= 500_000 and 0 <= args.repeats <= 5 and max(args.processes) <= PARTITIONS, "bounded bench"
    if not GLOBO.exists():
        sys.exit(f"{GLOBO} is missing: set ADLOOP_SHARED_DATA to the shared data folder")
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that the cluster nodes are stopped and the topics deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.monotonic() + args.budget_s
    load_before = os.getloadavg()
    messages, _ = load_globo(args.events)
    users = sorted({k for k, _ in messages})
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: os.cpu_count() = {os.cpu_count()}, {memory_gb:.0f} GiB RAM; load average {load_before[0]:.2f}")
    print(f"data: the first {len(messages):,} Globo clicks, {len(users):,} users; {PARTITIONS} partitions; "
          f"batches of up to {get_settings().consumer_batch_size:,}")  # fmt: skip
    base = get_settings().model_copy(update={"redis_cluster_nodes": None, "event_partitions": PARTITIONS})
    runs: list[Run] = []
    serves: list[Serve] = []
    workers = [int(w) for w in args.serve_workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="adloop-scale-") as root:
        print("standalone Redis (the stack's, database 7):", flush=True)
        runs += run_topology("standalone", base, Path(root) / "standalone", args, messages, users, deadline)
        if not args.skip_cluster:
            with local_cluster(Path(root)) as nodes:
                print(f"Redis Cluster, 3 masters ({nodes}):", flush=True)
                cluster = base.model_copy(update={"redis_cluster_nodes": nodes})
                runs += run_topology("cluster", cluster, Path(root) / "cluster", args, messages, users, deadline)
                if not args.skip_serve:  # consumers first: the serving sweeps are the part that may be cut short
                    serves += [serve("cluster", w, args, nodes, deadline) for w in workers]
        if not args.skip_serve:
            serves = [serve("standalone", w, args, None, deadline) for w in workers] + serves
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}, on {os.cpu_count()} cores")
    print("\n".join(table(runs)) if runs else "no consumer run finished")
    if serves:
        print()
        print("\n".join(serve_table(serves)))
    print("\n" + "\n".join(where_time_goes(runs)))


def where_time_goes(runs: list[Run]) -> list[str]:
    """Per topology and process count, the window's core-seconds split: consumers, Redis, Kafka, the rest
    of the machine (other sessions, this bench's poller), idle."""
    cores = os.cpu_count() or 1
    out = [f"where the time goes (medians, share of {cores} cores x the window):"]
    for key in dict.fromkeys((r.topology, r.processes) for r in runs):
        group = [r for r in runs if (r.topology, r.processes) == key]

        def share(name: str, group: list[Run] = group) -> float:
            values = [getattr(r, name) / (r.window_s * cores) for r in group if getattr(r, name) is not None]
            return statistics.median(values) if values else 0.0

        consumers, redis_, kafka, busy = (share(n) for n in ("consumer_cpu_s", "redis_cpu_s", "kafka_cpu_s",
                                                              "machine_busy_s"))  # fmt: skip
        per_process = consumers * cores / key[1]
        rest = max(0.0, busy - consumers - redis_ - kafka)
        out.append(f"  {key[0]}, {key[1]} process(es): consumers {consumers:.0%} ({per_process:.0%} of a core "
                   f"each), Redis {redis_:.0%}, Kafka {kafka:.0%}, everything else {rest:.0%}, "
                   f"idle {max(0.0, 1 - busy):.0%}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
