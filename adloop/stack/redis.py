"""Redis for the local stack: Debian's redis-server on loopback, installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import urlparse

from adloop.settings import Settings
from adloop.stack.processes import (
    StackError,
    _is_loopback,
    _port_open,
    _spawn,
    _tail_text,
    _wait_until,
    _write_pid_file,
)


def start_redis(settings: Settings) -> None:
    host, port = _redis_address(settings)
    if _redis_answers(settings.redis_url):
        return  # ours from an earlier `up`, or one the user runs: use it, leave it alone
    if not _is_loopback(host):
        raise StackError(
            f"Redis at {settings.redis_url} does not answer. Start it, or point ADLOOP_REDIS_URL at one that runs."
        )
    if _port_open(host, port):
        raise StackError(
            f"Port {host}:{port} is taken by something that is not Redis. Stop it, or set ADLOOP_REDIS_URL "
            "to a free port (e.g. redis://127.0.0.1:6380/0)."
        )
    server = _redis_server_binary()
    folder = settings.stack_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "redis.log"
    log.unlink(missing_ok=True)
    command = [
        server,
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(folder),
        "--daemonize",
        "no",
        "--logfile",
        str(log),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--protected-mode",
        "yes",
    ]
    proc = _spawn(command, log_path=None)
    _write_pid_file(settings, "redis", proc.pid, f"{host}:{port}", marker="redis-server")
    _wait_until(
        lambda: _redis_answers(settings.redis_url),
        proc=proc,
        what=f"Redis on {host}:{port}",
        log=log,
        timeout=settings.stack_start_timeout,
    )


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError("redis-server is not installed. Install it: sudo apt-get install -y redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"],
    ):
        done = subprocess.run(step, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise StackError(
                "Redis is not installable: `"
                + " ".join(step)
                + "` failed:\n"
                + _tail_text(done.stdout + done.stderr)
                + "\nInstall redis-server by hand, or point ADLOOP_REDIS_URL at a running Redis."
            )
    # Debian starts its own service on install; stop it so only the project's instance runs.
    subprocess.run(["service", "redis-server", "stop"], capture_output=True)
    found = shutil.which("redis-server")
    if not found:
        raise StackError("apt-get installed redis-server but it is not on PATH; check /usr/bin/redis-server.")
    return found


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _redis_address(settings: Settings) -> tuple[str, int]:
    parsed = urlparse(settings.redis_url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379
