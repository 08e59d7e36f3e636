"""`adloop serve --workers 2`: one `/metrics` view of the whole server, whichever worker answers the scrape."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from adloop.settings import PROJECT_ROOT, Settings
from tests.support.serving import free_port

pytestmark = pytest.mark.integration
REQUESTS = 40


def _get(port: int, path: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:  # a new connection each time
        return answer.read()


def test_two_workers_answer_one_metrics_view(local_stack: Settings, tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if "PROMETHEUS" not in k.upper() and k != "ADLOOP_METRICS_DIR"}
    env.update(ADLOOP_STACK_DIR=str(tmp_path / "stack"), ADLOOP_MODEL_REGISTRY_PATH=str(tmp_path / "models"),
               ADLOOP_FEAST_DATA_DIR=str(tmp_path / "feast"), ADLOOP_EVENTS_TOPIC="adloop.test.workers",
               ADLOOP_CATALOG_POLL_S="0", PYTHONPATH=str(PROJECT_ROOT))  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "adloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(port, "/healthz")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "adloop serve did not answer"
                time.sleep(0.2)
        time.sleep(2.0)  # both workers listening
        for i in range(REQUESTS):
            _get(port, "/v1/select", {"user_id": f"u{i}", "slots": [{"slot_id": "s", "format": "native"}]})
        counts = set()
        for _ in range(6):
            text = _get(port, "/metrics").decode()
            line = next(x for x in text.splitlines() if x.startswith('adloop_request_seconds_count{route="select"}'))
            counts.add(float(line.split()[-1]))
        assert counts == {float(REQUESTS)}  # every scrape sums both workers
        assert (tmp_path / "stack" / f"prometheus-{socket.gethostname()}-{port}").is_dir()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
