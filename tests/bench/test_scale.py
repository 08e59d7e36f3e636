"""bench.scale's pure parts: reading bench.serve's report, the medians table and the time split (no stack)."""

from __future__ import annotations

import math
import os

import pytest

from bench import serve
from bench.scale import Run, Serve, parse_serve, serve_table, table, where_time_goes


def _row(p99: float | None, errors: int = 0, achieved: float = 250.0) -> dict:
    return {"sent": 1000, "ok": 1000 - errors, "errors": errors, "p50": 2.0, "p99": p99, "achieved": achieved,
            "error_kinds": {}, "cpu_ms": 1.5}  # fmt: skip


def test_parse_serve_reads_what_bench_serve_prints(capsys: pytest.CaptureFixture[str]) -> None:
    rates = [250.0, 500.0, 750.0]
    results = {"select": {250.0: _row(5.5), 500.0: _row(12.25, achieved=500.0), 750.0: _row(None, errors=3)}}
    serve.report(results, rates, 4.0, {}, workers=2)  # the real report, so the parser follows its format
    capacity, rows = parse_serve(capsys.readouterr().out)
    assert capacity == 500.0
    assert sorted(rows) == rates
    assert rows[500.0]["p99"] == 12.25 and rows[500.0]["achieved"] == 500.0 and rows[500.0]["cpu_ms"] == 1.5
    assert math.isnan(rows[750.0]["p99"]) and rows[750.0]["errors"] == 3


def test_parse_serve_without_any_rate_under_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    serve.report({"select": {250.0: _row(25.0)}}, [250.0], 4.0, {}, workers=1)
    assert parse_serve(capsys.readouterr().out)[0] is None


def _run(topology: str, processes: int, events: int, window_s: float, **overrides: float) -> Run:
    fields = {"consumer_cpu_s": events * 100e-6, "redis_cpu_s": events * 30e-6, "kafka_cpu_s": None,
              "machine_busy_s": 1.5 * window_s, "memory_bytes": 1_000_000, "keys": 2000, "users": 1000,
              "state_row_bytes": 1100.0, "total_events": 4000, "produce_rate": 9000.0, **overrides}  # fmt: skip
    return Run(topology=topology, processes=processes, events=events, window_s=window_s, **fields)


def test_table_gives_medians_and_the_ratio_to_one_process() -> None:
    runs = [_run("standalone", 1, 4000, 2.0), _run("standalone", 1, 4000, 1.0), _run("standalone", 1, 4000, 4.0),
            _run("standalone", 2, 3000, 1.0), _run("standalone", 2, 3000, 0.5)]  # fmt: skip
    lines = table(runs)
    one = next(line for line in lines if line.startswith("| standalone | 1 |"))
    two = next(line for line in lines if line.startswith("| standalone | 2 |"))
    cells = [c.strip() for c in two.split("|")[1:-1]]
    assert one.split("|")[4].strip() == "2,000"  # median of 1,000 / 2,000 / 4,000 events/s
    assert cells[2:5] == ["2", "4,500", "2.25x"]  # median of 3,000 and 6,000; 4,500 / 2,000
    assert cells[5:8] == ["100", "30", "-"]  # CPU us per event; Kafka not measured
    assert cells[9:] == ["1,000", "250", "2.00", "1,100"]  # bytes per user and per event, keys per user


def test_serve_table_says_what_was_not_measured() -> None:
    measured = Serve("standalone", 1, capacity=500.0, rows={250.0: {"p99": 5.0, "cpu_ms": 1.2}})
    failed = Serve("cluster", 1, not_measured="bench.serve failed: no route")
    lines = serve_table([measured, failed])
    assert "| standalone | 1 | 500/s | 250/s: 5.0 | 1.20 |" in lines
    assert any("not measured: bench.serve failed: no route" in line for line in lines)


def test_where_time_goes_splits_the_window() -> None:
    run = _run("cluster", 2, 10_000, 10.0, consumer_cpu_s=10.0, redis_cpu_s=2.0, kafka_cpu_s=1.0, machine_busy_s=16.0)
    line = where_time_goes([run])[1]
    cores = os.cpu_count() or 1
    assert f"consumers {10 / (10 * cores):.0%}" in line and f"Redis {2 / (10 * cores):.0%}" in line
