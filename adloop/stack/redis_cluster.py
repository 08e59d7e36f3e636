"""A real local Redis Cluster for scale-out work: three masters of Debian's redis-server on loopback,
joined with `redis-cli --cluster create`.

`ADLOOP_REDIS_CLUSTER_NODES` (e.g. `127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`) names the nodes;
`adloop stack up --redis-cluster` starts the missing ones and creates the cluster once, `down` stops
what it started, `status` shows each node's slots. Node data lives in `<stack_dir>/redis-cluster/<port>`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis

from adloop.settings import Settings
from adloop.stack.processes import (
    StackError,
    _alive,
    _is_loopback,
    _port_open,
    _read_pid_file,
    _spawn,
    _tail_file,
    _terminate,
    _wait_until,
    _write_pid_file,
)
from adloop.stack.redis import _redis_server_binary
from features.redis_client import cluster_nodes

SLOTS = 16384


def nodes(settings: Settings) -> list[tuple[str, int]]:
    """(host, port) of every configured cluster node; StackError when none is configured."""
    if not settings.redis_cluster_nodes:
        raise StackError("no Redis Cluster configured: set ADLOOP_REDIS_CLUSTER_NODES=127.0.0.1:7000,...")
    return cluster_nodes(settings)


def free_cluster_ports(n: int, first: int) -> list[int]:
    """`n` free loopback ports from `first` whose cluster bus (port + 10000) is free too (a node's port must
    be 55535 or less): for a cluster started on the side (the tests', a bench's)."""
    ports: list[int] = []
    for port in range(first, first + 800):
        if _bindable(port) and _bindable(port + 10_000):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise StackError(f"no {n} free ports for a Redis Cluster from {first}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_cluster(settings: Settings) -> None:
    """Start the nodes that do not answer, then create the cluster if its slots are not all served."""
    members = nodes(settings)
    server = _redis_server_binary()
    for host, port in members:
        if _answers(host, port):
            continue
        if not _is_loopback(host):
            raise StackError(f"Redis Cluster node {host}:{port} does not answer; start it or fix the nodes setting")
        if _port_open(host, port):
            raise StackError(f"port {host}:{port} is taken by something that is not Redis")
        folder = settings.stack_dir / "redis-cluster" / str(port)
        shutil.rmtree(folder, ignore_errors=True)  # a node without its cluster cannot rejoin it: start afresh
        folder.mkdir(parents=True)
        log = folder / "redis.log"
        command = [server, "--bind", host, "--port", str(port), "--dir", str(folder), "--daemonize", "no",
                   "--logfile", str(log), "--save", "", "--appendonly", "yes", "--protected-mode", "yes",
                   "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", "5000"]  # fmt: skip
        proc = _spawn(command, log_path=None)
        _write_pid_file(settings, _name(port), proc.pid, f"{host}:{port}", marker="redis-server")
        _wait_until(lambda h=host, p=port: _answers(h, p), proc=proc, what=f"Redis Cluster node {host}:{port}",
                    log=log, timeout=settings.stack_start_timeout)  # fmt: skip
    if served_slots(settings) == SLOTS:
        return
    cli = shutil.which("redis-cli")
    if cli is None:
        raise StackError("redis-cli is missing (Debian: apt-get install -y redis-tools)")
    addresses = [f"{h}:{p}" for h, p in members]
    create = [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
    done = subprocess.run(create, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise StackError(f"redis-cli --cluster create failed: {done.stdout[-1500:]} {done.stderr[-1500:]}")
    deadline = time.monotonic() + settings.stack_start_timeout
    while not _cluster_ok(*members[0]):
        if time.monotonic() > deadline:
            log = settings.stack_dir / "redis-cluster" / str(members[0][1]) / "redis.log"
            raise StackError(f"the cluster did not reach cluster_state:ok; {_tail_file(log)}")
        time.sleep(0.2)


def stop_cluster(settings: Settings) -> list[str]:
    """Stop the nodes `start_cluster` started (its pid files, whatever the nodes setting says now)."""
    stopped = []
    for path in sorted(settings.stack_dir.glob("redis-cluster-*.pid.json")):
        name = path.name.removesuffix(".pid.json")
        record = _read_pid_file(settings, name)
        if record and _alive(record["pid"], record["marker"]):
            _terminate(record["pid"])
            stopped.append(name)
        path.unlink(missing_ok=True)
    return stopped


def slot_table(settings: Settings) -> list[tuple[str, int, str]]:
    """(node, slots it serves, its slot ranges) from CLUSTER SHARDS of the first node that answers."""
    for host, port in nodes(settings):
        if not _answers(host, port):
            continue
        rows = []
        for shard in redis.Redis(host=host, port=port, socket_timeout=2).execute_command("CLUSTER SHARDS"):
            shard = dict(zip(shard[::2], shard[1::2], strict=True))
            ranges = shard[b"slots"]
            count = sum(int(b) - int(a) + 1 for a, b in zip(ranges[::2], ranges[1::2], strict=True))
            master = next(dict(zip(n[::2], n[1::2], strict=True)) for n in shard[b"nodes"])
            address = f"{master[b'ip'].decode()}:{master[b'port']}"
            spans = ", ".join(f"{a}-{b}" for a, b in zip(ranges[::2], ranges[1::2], strict=True))
            rows.append((address, count, spans))
        return sorted(rows)
    return []


def served_slots(settings: Settings) -> int:
    return sum(count for _, count, _ in slot_table(settings))


def _answers(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _cluster_ok(host: str, port: int) -> bool:
    info = redis.Redis(host=host, port=port, socket_timeout=2, decode_responses=True).execute_command("CLUSTER INFO")
    return info.get("cluster_state") == "ok"  # redis-py parses the reply into a dict


def _name(port: int) -> str:
    return f"redis-cluster-{port}"
