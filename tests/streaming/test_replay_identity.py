"""Replayed files through the real broker and consumer: two files both apply, the same file twice applies once."""

from __future__ import annotations

from pathlib import Path

import pytest

from adloop.settings import Settings
from streaming.producer import build_producer, produce_events
from streaming.replay import read
from tests.support.stack import consume_all

pytestmark = pytest.mark.integration


def _replay(settings: Settings, path: Path) -> int:
    producer = build_producer(settings)
    try:
        summary = produce_events(producer, settings.events_topic, read(path, "taobao"))
    finally:
        producer.close()
    assert summary.failed == 0
    return summary.count


def test_two_files_of_a_data_set_both_apply_and_a_file_twice_applies_once(feature_settings: Settings, tmp_path: Path):
    lines = [f"{u},{100 + i % 37},{i % 5},{('pv', 'cart', 'fav', 'buy')[i % 4]},{1511658000 + i // 3}"
             for i, u in enumerate(range(600))]  # fmt: skip
    lines[10] = lines[11]  # a line repeated byte for byte within a file: two events
    first, last = tmp_path / "first.csv", tmp_path / "last.csv"
    first.write_text("\n".join(lines[:300]) + "\n")
    last.write_text("\n".join(lines[300:]) + "\n")

    sent = _replay(feature_settings, first)
    report = consume_all(feature_settings, sent)
    assert (report.applied, report.duplicates) == (300, 0)

    sent = _replay(feature_settings, last)  # the probe: the last lines, as a second file
    report = consume_all(feature_settings, sent)
    assert (report.applied, report.duplicates) == (300, 0)

    sent = _replay(feature_settings, first)  # the first file again: nothing new
    report = consume_all(feature_settings, sent)
    assert (report.applied, report.duplicates) == (0, 300)
