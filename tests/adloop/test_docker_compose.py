"""docker-compose.yml is a valid Compose file (checked by the compose CLI where one is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed: cannot check docker-compose.yml")
    done = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for service in ("kafka", "redis", "api", "consumer"):
        assert f"  {service}:" in done.stdout
