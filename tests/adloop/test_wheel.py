"""The installed package alone runs the services' set-up: build the wheel, install it into an empty virtual
environment, then `adloop --help`, the Feast apply step and `adloop serve` (answering from the catalog that
ships in the package) with no checkout on the path.

The new environment is empty of adloop: the wheel goes in with `pip install --no-deps`, and a .pth file
puts the project environment's site-packages after its own, so third-party dependencies (torch, Feast,
...) resolve without a download. Python does not process the .pth files of a folder named in a .pth, so
the project's own editable install (a .pth there) does not leak in; the test checks where `adloop`
was imported from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from adloop.settings import PROJECT_ROOT, Settings
from tests.support.serving import free_port

pytestmark = pytest.mark.integration
PACKAGES = ("adloop", "streaming", "features", "serving", "models", "outcomes")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def test_the_wheel_alone_runs_help_the_feast_apply_step_and_serves(local_stack: Settings, tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source)
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
         cwd=source)  # fmt: skip
    (wheel,) = tmp_path.glob("adloop-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    (site / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"  # no checkout in the working directory or on PYTHONPATH
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ADLOOP_")}
    env |= {"ADLOOP_REDIS_URL": local_stack.redis_url, "ADLOOP_FEAST_DATA_DIR": str(tmp_path / "feast"),
            "ADLOOP_STACK_DIR": str(tmp_path / "stack")}  # fmt: skip
    where = _run([str(python), "-c", "import adloop, features; print(adloop.__file__, features.__file__)"],
                 cwd=work, env=env).stdout  # fmt: skip
    assert str(PROJECT_ROOT) not in where and str(site) in where, where
    assert "features" in _run([str(venv / "bin" / "adloop"), "--help"], cwd=work, env=env).stdout
    applied = _run([str(venv / "bin" / "adloop"), "features", "apply"], cwd=work, env=env).stdout
    assert str(site / "features" / "repo") in applied.replace("\n", "")
    assert any((tmp_path / "feast").rglob("registry*")), list((tmp_path / "feast").rglob("*"))
    _serves_the_packaged_catalog(venv, site, work, env | {"ADLOOP_MODEL_REGISTRY_PATH": str(tmp_path / "models")})


def _serves_the_packaged_catalog(venv: Path, site: Path, work: Path, env: dict[str, str]) -> None:
    """`adloop serve` from the wheel: the default catalog is the package's, and /v1/select answers from it (no
    model promoted: CTR x bid; Kafka on a closed port: the answer says its impressions are not logged)."""
    port = free_port()
    env = env | {"ADLOOP_API_PORT": str(port), "ADLOOP_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    server = subprocess.Popen([str(venv / "bin" / "adloop"), "serve"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, ready = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready is not None, server.stdout.read() if server.poll() is not None else "no answer within 120 s"
        catalog = ready["checks"]["catalog"]
        assert catalog["ok"] and catalog["ads"] > 0, ready
        body = {"user_id": "u1", "slots": [{"slot_id": "s", "format": "native"}]}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/select", json=body, timeout=10).json()
        assert answer["slots"][0]["ads"] and answer["degraded"] == ["impression_log"], answer
        code = "from adloop.settings import Settings; print(Settings().catalog_path)"
        where = _run([str(venv / "bin" / "python"), "-c", code], cwd=work, env=env).stdout
        assert where.strip() == str(site / "serving" / "data" / "ads.csv"), where
    finally:
        server.terminate()
        server.wait(timeout=30)
