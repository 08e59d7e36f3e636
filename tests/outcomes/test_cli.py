"""`adloop report` and `adloop ope` through the CLI (typer's runner): tables, charts, exit codes."""

from __future__ import annotations

from typer.testing import CliRunner

from adloop import cli
from adloop.cli import observe
from adloop.settings import PROJECT_ROOT, Settings
from outcomes.store import OutcomeStore
from tests.support.events import impression


def test_report_prints_arms_lift_campaigns_models_and_writes_two_charts(tmp_path, monkeypatch):
    store = OutcomeStore(tmp_path / "o.duckdb")
    store.setup()
    events = [e for i in range(40) for e in impression(i, arm="control" if i % 2 else "targeted", clicked=i % 3 == 0)]
    store.write(events)
    monkeypatch.setattr(observe, "get_settings", lambda: Settings(outcomes_path=store.path, report_dir=tmp_path / "r"))
    result = CliRunner().invoke(cli.app, ["report"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "40 impressions, 14 clicks" in result.output
    for title in ("Click rate per arm", "Lift of targeted over control", "Newcombe", "cmp-1", "Model versions"):
        assert title in result.output
    charts = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert charts == ["campaigns.png", "ctr_over_time.png"]
    assert all((tmp_path / "r" / c).stat().st_size > 5_000 for c in charts)


def test_ope_command_on_the_committed_slice():
    result = CliRunner().invoke(cli.app, ["ope", "--root", str(PROJECT_ROOT / "data" / "obd")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "random" in result.output and "bts" in result.output and "(z " in result.output
