"""Imports only go down (pyproject.toml's import-linter contract; docs/DESIGN.md, "Layers")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return contract["layers"]


def test_lint_imports_keeps_the_layers_contract() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_every_streaming_module_is_in_a_layer() -> None:
    """The contract lists streaming's modules one by one (the contract module sits lower than the rest):
    a new module left out would escape the check."""
    listed = {name.strip() for layer in _layers() for name in layer.replace("|", ":").split(":")}
    modules = {f"streaming.{p.stem if p.is_file() else p.name}" for p in (ROOT / "streaming").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}  # fmt: skip
    assert modules - listed == set()


def test_a_broken_import_is_caught(tmp_path: Path) -> None:
    """The check can fail: a features module importing serving breaks the contract."""
    for package in ("adloop", "streaming", "features", "models", "serving", "outcomes"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "features" / "upward.py").write_text("import serving.app  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode != 0 and "features.upward -> serving.app" in result.stdout
