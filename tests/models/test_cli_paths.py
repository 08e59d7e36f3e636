"""`adloop train` / `adloop evaluate` find the MIND folder: the argument, $ADLOOP_SHARED_DATA, ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from adloop.cli import learn


def _mind(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "behaviors.tsv").write_text("")
    return folder


def test_mind_path_prefers_the_argument_then_the_shared_data_variable(tmp_path: Path, monkeypatch) -> None:
    given, shared = _mind(tmp_path / "given"), _mind(tmp_path / "elsewhere" / "mind")
    monkeypatch.setenv("ADLOOP_SHARED_DATA", str(shared.parent))
    assert learn._mind_path(given) == given
    assert learn._mind_path(None) == shared
    assert learn._mind_path(given / "behaviors.tsv") == given  # the file itself names its folder


def test_mind_path_without_data_exits_clearly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADLOOP_SHARED_DATA", str(tmp_path / "nothing"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("adloop.settings.PROJECT_ROOT", tmp_path / "project")
    with pytest.raises(typer.Exit):
        learn._mind_path(None)
