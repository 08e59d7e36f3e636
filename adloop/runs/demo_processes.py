"""The demo's processes: the feature consumer, the outcomes lander and the API as subprocesses of one
environment, always stopped; and the few HTTP calls the demo makes to its API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from adloop.settings import Settings

START_TIMEOUT_S = 90.0  # the API and the consumers import the whole stack: seconds on a busy laptop


def environment(settings: Settings, *, catalog_path: Path, port: int, token: str, control_share: float):
    """ADLOOP_* for the subprocesses: these settings, the demo catalog, the arm split, the admin token."""
    names = ("kafka_bootstrap_servers", "events_topic", "dlq_topic", "redis_url", "feast_repo_path",
             "feast_data_dir", "model_registry_path", "outcomes_path", "stack_dir", "consumer_batch_size")  # fmt: skip
    env = {**os.environ, **{f"ADLOOP_{n.upper()}": str(getattr(settings, n)) for n in names}}
    env.update(
        ADLOOP_CATALOG_PATH=str(catalog_path),
        ADLOOP_API_PORT=str(port),
        ADLOOP_ADMIN_TOKEN=token,
        ADLOOP_CONTROL_SHARE=str(control_share),
        ADLOOP_AD_STATS_REFRESH_S="5",
        ADLOOP_SERVE_EPSILON_NO_MODEL="1.0",  # the first phase explores: the first model needs varied ads
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                 os.environ.get("PYTHONPATH")])),
    )  # fmt: skip
    return env


@contextmanager
def processes(logs: Path, env: dict[str, str], port: int) -> Iterator[dict[str, subprocess.Popen]]:
    """Start the feature consumer, the lander and the API; always stop them (SIGTERM, then SIGKILL)."""
    cli = [sys.executable, "-m", "adloop.cli"]
    commands = {
        "feature consumer": [*cli, "consume", "--metrics-port", str(free_port())],
        "outcomes lander": [*cli, "land"],
        "API": [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
    }
    started: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            out = open(logs / f"{name.replace(' ', '_')}.log", "wb")  # noqa: SIM115  (closed with the process)
            started[name] = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            out.close()
        yield started
    finally:
        for process in started.values():
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in started.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def wait_ready(base: str, started: dict[str, subprocess.Popen]) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, process in started.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} (see the demo folder's logs/)")
        with suppress(httpx.HTTPError):
            if httpx.get(base + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the API did not answer at {base} within {START_TIMEOUT_S:g} s")


def post(url: str, body: dict | None, *, token: str) -> dict:
    import httpx

    response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    response.raise_for_status()
    return response.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
