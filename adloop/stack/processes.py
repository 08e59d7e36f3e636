"""Processes of the local stack: spawn, wait with a bound, stop, and the pid files that say what `up` started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from adloop.settings import Settings

LOG_TAIL_LINES = 30


class StackError(RuntimeError):
    """A stack step failed; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    running: bool
    owned: bool  # started by `adloop stack up` (so `down` stops it)
    pid: int | None = None
    since: str | None = None  # ISO time the process was started
    detail: str = ""


def _spawn(command: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
    """Start a server in its own session, so it outlives the `adloop` command that started it."""
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        if log_path:
            output.close()  # type: ignore[union-attr]


def _wait_until(ready, *, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StackError(
                f"{what} exited with code {proc.returncode} while starting. Its log ({log}):\n{_tail_file(log)}"
            )
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise StackError(
                f"{what} did not answer within {timeout:.0f} s; stopped it. Its log ({log}):\n{_tail_file(log)}"
            )
        time.sleep(0.2)


def _terminate(pid: int, grace: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # its own session: the group is the server and its children
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _pid_exists(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _pid_exists(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _alive(pid: int, marker: str) -> bool:
    """The pid runs and is the server we started (not a recycled pid)."""
    if not _pid_exists(pid):
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.stack_dir / f"{name}.pid.json"


def _write_pid_file(settings: Settings, name: str, pid: int, address: str, *, marker: str) -> None:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"pid": pid, "address": address, "since": started, "marker": marker}
    _pid_file(settings, name).write_text(json.dumps(record))


def _read_pid_file(settings: Settings, name: str) -> dict | None:
    path = _pid_file(settings, name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log written)"
