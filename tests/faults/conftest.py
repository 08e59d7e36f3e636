"""A stack of the fault suite's own: a Kafka broker and a Redis on free loopback ports under a temporary
stack_dir, so stopping, freezing or restarting them never touches the stack the other tests share."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from adloop import stack
from adloop.settings import Settings
from adloop.stack.processes import _read_pid_file
from features import store
from tests.support.serving import free_port


@pytest.fixture(scope="session")
def fault_stack(local_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Kafka + Redis started for the fault suite alone (the shared stack's broker jars, hard-linked)."""
    folder = tmp_path_factory.mktemp("fault-stack")
    libs = local_stack.stack_dir / "kafka" / "libs"
    if libs.exists():  # spares a Maven run: the jars of the shared stack are the same version
        shutil.copytree(libs, folder / "kafka" / "libs", copy_function=os.link)
    settings = local_stack.model_copy(
        update={
            "stack_dir": folder,
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
            "kafka_controller_port": free_port(),
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            "feast_data_dir": folder / "feast",
            "model_registry_path": folder / "models",
            "outcomes_path": folder / "outcomes.duckdb",
            "report_dir": folder / "report",
            "stack_start_timeout": 180.0,  # a broker start takes 15-50 s here; more on a loaded machine
        }
    )
    try:
        stack.up(settings)
    except stack.StackError as error:
        pytest.fail(f"The fault suite's own stack could not start: {error}")
    store.apply(settings)
    yield settings
    for name in ("kafka", "redis"):
        resume(settings, name)  # a frozen process would not stop
    stack.down(settings)


def pid_of(settings: Settings, name: str) -> int:
    record = _read_pid_file(settings, name)
    assert record, f"{name} of the fault stack has no pid file"
    return record["pid"]


def stop(settings: Settings, name: str) -> None:
    """Stop one service of the fault stack (SIGTERM, waited for): a broker or Redis outage."""
    pid = pid_of(settings, name)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _exists(pid), f"{name} (pid {pid}) did not stop within 30 s"


def start(settings: Settings, name: str) -> None:
    """Start it again on the same ports and data (waits until it answers)."""
    (stack.start_kafka if name == "kafka" else stack.start_redis)(settings)


def freeze(settings: Settings, name: str) -> None:
    os.kill(pid_of(settings, name), signal.SIGSTOP)


def resume(settings: Settings, name: str) -> None:
    record = _read_pid_file(settings, name)
    if record and _exists(record["pid"]):
        os.kill(record["pid"], signal.SIGCONT)


def wait_redis(settings: Settings, timeout_s: float = 30) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            assert time.monotonic() < deadline, "the fault stack's Redis did not answer again"
            time.sleep(0.1)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the process that spawned it) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


from tests.serving.conftest import bundle, catalog_file, catalog_rows, make_app  # noqa: E402, F401  (serving fixtures)
