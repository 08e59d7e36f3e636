"""The committed JSON Schema matches the contract; the CLI's simulate -> JSONL -> replay path works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adloop.cli import app
from adloop.settings import PROJECT_ROOT, Settings
from streaming.events import json_schema
from streaming.replay import read

runner = CliRunner()


def test_committed_schema_is_the_generated_one() -> None:
    committed = PROJECT_ROOT / "docs" / "events.schema.json"
    assert json.loads(committed.read_text(encoding="utf-8")) == json_schema(), "run `adloop events schema`"
    result = runner.invoke(app, ["events", "schema", "--check"])
    assert result.exit_code == 0, result.output


def test_schema_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "events.schema.json"
    stale.write_text("{}\n")
    assert runner.invoke(app, ["events", "schema", "--check", "--out", str(stale)]).exit_code == 1
    assert runner.invoke(app, ["events", "schema", "--out", str(stale)]).exit_code == 0
    assert json.loads(stale.read_text()) == json_schema()


def test_simulate_to_jsonl_replays_identically(tmp_path: Path) -> None:
    out = tmp_path / "sim.jsonl"
    result = runner.invoke(app, ["simulate", "--users", "20", "--events", "200", "--seed", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output
    events = list(read(out, "jsonl"))
    assert len(events) == 200 and all(e.source == "simulate" for e in events)


@pytest.mark.integration
def test_replay_command_sends_the_committed_obd_slice(local_stack: Settings, topic: str) -> None:
    path = PROJECT_ROOT / "data" / "obd" / "random" / "all" / "all.csv"
    result = runner.invoke(app, ["replay", str(path), "--format", "obd", "--limit", "50", "--topic", topic])
    assert result.exit_code == 0, result.output
    assert "50 events" in result.output and "ad_impression" in result.output


def test_every_json_example_in_the_docs_is_a_valid_event() -> None:
    import re

    from streaming.events import parse_event

    text = (PROJECT_ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    examples = re.findall(r"```json\n(.*?)\n```", text, flags=re.S)
    kinds = {parse_event(example.encode()).event_type.value for example in examples}
    assert len(examples) == 8
    assert kinds == {"page_view", "search", "favorite", "add_to_cart", "purchase", "ad_impression", "ad_click",
                     "conversion"}  # fmt: skip


@pytest.mark.integration
def test_replay_command_stops_on_a_malformed_line_naming_it(local_stack: Settings, topic: str, tmp_path: Path) -> None:
    path = tmp_path / "ub.csv"
    path.write_text("1,100,7,pv,1511658000\n1,100,7\n")
    result = runner.invoke(app, ["replay", str(path), "--format", "taobao", "--topic", topic])
    assert result.exit_code == 1
    assert "ub.csv:2: expected 5 comma-separated fields, got 3" in result.output


def test_replay_command_without_a_broker_says_how_to_start_it(tmp_path: Path, monkeypatch) -> None:
    from adloop.settings import get_settings
    from streaming import producer

    monkeypatch.setenv("ADLOOP_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setitem(producer.PRODUCER_CONFIG, "bootstrap_timeout_ms", 300)
    get_settings.cache_clear()
    try:
        path = PROJECT_ROOT / "data" / "obd" / "random" / "all" / "all.csv"
        result = runner.invoke(app, ["replay", str(path), "--format", "obd", "--limit", "1"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "no Kafka broker answered at 127.0.0.1:1" in result.output and "adloop stack up" in result.output
