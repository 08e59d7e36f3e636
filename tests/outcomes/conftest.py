"""Outcome fixtures: a fresh events topic + dead-letter topic and a DuckDB file per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adloop.runs.isolated import isolated_settings
from adloop.settings import Settings

OUTCOMES_REDIS_DB = 10  # emptied per test; no other suite's fixture uses it


@pytest.fixture
def outcome_settings(local_stack: Settings, tmp_path) -> Iterator[Settings]:
    with isolated_settings(local_stack, tmp_path, redis_db=OUTCOMES_REDIS_DB, prefix="adloop.test.outcomes",
                           partitions=3) as settings:  # fmt: skip
        yield settings
