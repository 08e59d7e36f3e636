"""`adloop report` and `adloop ope` through the CLI (typer's runner): tables, charts, exit codes."""

from __future__ import annotations

from typer.testing import CliRunner

from adloop import cli
from adloop.cli import observe
from adloop.settings import PROJECT_ROOT, Settings
from outcomes.store import OutcomeStore
from streaming.events import EventType
from tests.support.events import IMPRESSION_T0, impression


def test_report_prints_arms_lift_campaigns_models_and_writes_two_charts(tmp_path, monkeypatch):
    store = OutcomeStore(tmp_path / "o.duckdb")
    store.setup()
    events = [e for i in range(40) for e in impression(i, arm="control" if i % 2 else "targeted", clicked=i % 3 == 0)]
    # money: a click costs $0.50 (14 clicks, 7 per campaign and arm); clicks of i % 6 == 0 (cmp-0, targeted)
    # convert for $10
    events = [e.model_copy(update={"cost": 0.5}) if e.event_type is EventType.ad_click else e for e in events]
    conversion = {"event_type": EventType.conversion, "value": 10.0, "cost": None}
    events += [
        e.model_copy(update={**conversion, "event_id": f"{e.event_id}-cnv"})
        for e in events
        if e.event_type is EventType.ad_click and int(e.event_id.split("-")[1]) % 6 == 0
    ]
    store.write(events)
    monkeypatch.setattr(observe, "get_settings", lambda: Settings(outcomes_path=store.path, report_dir=tmp_path / "r"))
    result = CliRunner().invoke(cli.app, ["report"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "40 impressions, 14 clicks, 7 conversions" in result.output
    for title in ("Click rate per arm", "Lift of targeted over control", "Newcombe", "cmp-1", "Model versions",
                  "Per campaign (top 15 by spend)", "Spend ledger per day and arm"):  # fmt: skip
        assert title in result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Per campaign (top 15 by spend)" in line)
    cmp0 = next(line for line in lines[start:] if "cmp-0" in line).split("│")
    # impressions, conversions, conv. rate, revenue, spend, CPA, ROAS
    assert [c.strip() for c in cmp0[2:9]] == ["20", "7", "35.00%", "$70.00", "$3.50", "$0.50", "20.00"]
    day = IMPRESSION_T0.strftime("%Y-%m-%d")
    start = next(i for i, line in enumerate(lines) if "Spend ledger per day and arm" in line)
    ledger = [[c.strip() for c in line.split("│")[1:5]] for line in lines[start:] if day in line]
    assert ledger == [[day, "control", "7", "$3.50"], [day, "targeted", "7", "$3.50"]]
    charts = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert charts == ["campaigns.png", "ctr_over_time.png"]
    assert all((tmp_path / "r" / c).stat().st_size > 5_000 for c in charts)


def test_ope_command_on_the_committed_slice():
    result = CliRunner().invoke(cli.app, ["ope", "--root", str(PROJECT_ROOT / "data" / "obd")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "random" in result.output and "bts" in result.output and "(z " in result.output
