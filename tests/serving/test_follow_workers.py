"""`adloop serve --workers 2` follows promotions and rollbacks by itself: every worker (told apart by the
pid in `/readyz`) serves the new version within the poll bound, and no request fails meanwhile. Two
`adloop serve` processes on separate registry folders (each its own copy of the artifacts) follow the
pointer mirrored in Redis.

Prints the time from each promotion to the last worker serving it (docs/operations.md quotes it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from adloop.runs.isolated import with_db
from adloop.settings import PROJECT_ROOT, Settings
from models.pointer_mirror import KEY
from models.registry import Registry
from tests.support.serving import free_port
from tests.support.stack import TEST_REDIS_DB
from tests.support.trained import registry_with

pytestmark = pytest.mark.integration
POLL_S = 2.0  # the default of ADLOOP_MODEL_POLL_S
SLOTS = [{"slot_id": "s", "format": "native"}]
BOUND_S = 20.0  # poll + load (torch, LightGBM, the lleaves compile of a new version) on a shared 2-core machine


def _call(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # a new connection each time
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:  # /readyz answers 503 with its report
        return json.loads(error.read())


def _every_worker_serves(port: int, version: str, workers: int, since: float) -> float:
    """Poll /readyz on fresh connections until `workers` distinct pids report `version`; seconds taken."""
    seen: dict[int, str] = {}
    while True:
        ready = _call(port, "/readyz")
        seen[ready["pid"]] = ready["model_version"]
        if len(seen) >= workers and all(v == version for v in seen.values()):
            return time.monotonic() - since
        assert time.monotonic() - since < BOUND_S, f"workers did not converge on {version}: {seen}"
        time.sleep(0.05)


def test_every_worker_follows_promotion_and_rollback(local_stack: Settings, tmp_path) -> None:
    registry = registry_with(tmp_path / "models", 2)
    registry.promote("v0001")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if "PROMETHEUS" not in k.upper() and k != "ADLOOP_METRICS_DIR"}
    env.update(ADLOOP_STACK_DIR=str(tmp_path / "stack"), ADLOOP_MODEL_REGISTRY_PATH=str(registry.root),
               ADLOOP_EVENTS_TOPIC="adloop.test.follow", ADLOOP_CATALOG_POLL_S="0",
               ADLOOP_MODEL_POLL_S=str(POLL_S), PYTHONPATH=str(PROJECT_ROOT))  # fmt: skip
    log_file = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "adloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=log_file.open("w"),
    )  # fmt: skip
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            try:
                body = _call(port, "/v1/select", {"user_id": f"u{i % 50}", "slots": SLOTS})
                results.append((200 if "slots" in body else 500, body.get("model_version", "")))
            except Exception as error:  # a refused or dropped connection is a failed request
                results.append((0, repr(error)))
            i += 1

    try:
        deadline = time.monotonic() + 240  # two workers importing torch on 2 busy cores
        while True:
            try:
                _call(port, "/healthz")
                break
            except OSError:
                assert server.poll() is None, log_file.read_text()
                assert time.monotonic() < deadline, "adloop serve did not answer"
                time.sleep(0.2)
        _every_worker_serves(port, "v0001", 2, time.monotonic())  # both workers up
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        promoted = time.monotonic()
        registry.promote("v0002")
        to_new = _every_worker_serves(port, "v0002", 2, promoted)
        rolled = time.monotonic()
        assert registry.rollback() == "v0001"
        to_old = _every_worker_serves(port, "v0001", 2, rolled)
        time.sleep(0.5)
        stop.set()
        sender.join(timeout=15)
    finally:
        stop.set()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"\npromotion -> last of 2 workers serving it: {to_new:.2f} s; rollback: {to_old:.2f} s "
          f"(ADLOOP_MODEL_POLL_S={POLL_S}); {len(results)} requests meanwhile")  # fmt: skip
    swaps = [line for line in log_file.read_text().splitlines() if "now serving model" in line]
    assert len(swaps) >= 4, swaps  # each worker logged both changes
    failed = [r for r in results if r[0] != 200]
    assert results and not failed, failed[:5]
    assert {v for _, v in results} <= {"v0001", "v0002"}
    assert to_new <= BOUND_S and to_old <= BOUND_S


def _serve(env: dict[str, str], port: int, log_file) -> subprocess.Popen:
    command = [sys.executable, "-m", "adloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=log_file.open("w"))


def _answers(port: int, server: subprocess.Popen, log_file, deadline: float) -> None:
    while True:
        try:
            _call(port, "/healthz")
            return
        except OSError:
            assert server.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "adloop serve did not answer"
            time.sleep(0.2)


def test_replicas_on_their_own_folders_follow_the_pointer_in_redis(local_stack: Settings, tmp_path) -> None:
    redis_url = with_db(local_stack.redis_url, TEST_REDIS_DB)
    main = Registry.from_settings(local_stack.model_copy(update={"redis_url": redis_url,
                                                                 "model_registry_path": tmp_path / "a"}))  # fmt: skip
    main.mirror._client.delete(KEY)
    registry_with(tmp_path / "a", 2)
    main.promote("v0001")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # replica b: a synced copy; its pointer file never changes
    env = {k: v for k, v in os.environ.items() if "PROMETHEUS" not in k.upper() and k != "ADLOOP_METRICS_DIR"}
    env.update(ADLOOP_STACK_DIR=str(tmp_path / "stack"), ADLOOP_REDIS_URL=redis_url,
               ADLOOP_EVENTS_TOPIC="adloop.test.follow", ADLOOP_CATALOG_POLL_S="0",
               ADLOOP_MODEL_POLL_S=str(POLL_S), PYTHONPATH=str(PROJECT_ROOT))  # fmt: skip
    ports = {name: free_port() for name in ("a", "b")}
    logs = {name: tmp_path / f"serve-{name}.log" for name in ports}
    servers = {name: _serve(env | {"ADLOOP_MODEL_REGISTRY_PATH": str(tmp_path / name)}, ports[name], logs[name])
               for name in ports}  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        for name, server in servers.items():
            _answers(ports[name], server, logs[name], deadline)
            _every_worker_serves(ports[name], "v0001", 1, time.monotonic())
        promoted = time.monotonic()
        main.promote("v0002")
        to_new = max(_every_worker_serves(ports[name], "v0002", 1, promoted) for name in ports)
        assert Registry(tmp_path / "b").promoted() == "v0001"  # b's own folder still says v0001: it followed Redis
        rolled = time.monotonic()
        assert main.rollback() == "v0001"
        to_old = max(_every_worker_serves(ports[name], "v0001", 1, rolled) for name in ports)
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGINT)
        for server in servers.values():
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        main.mirror._client.delete(KEY)
    print(f"\npromotion -> both replicas serving it: {to_new:.2f} s; rollback: {to_old:.2f} s (through Redis)")
    assert to_new <= BOUND_S and to_old <= BOUND_S
