"""Taobao UserBehavior (Alibaba Tianchi): `user_id,item_id,category_id,behavior_type,timestamp` CSV, no header.

Behaviours map to the contract as pv -> page_view, cart -> add_to_cart, fav -> favorite,
buy -> purchase; `timestamp` is unix seconds. Event ids are `taobao-<line number>` (1-based).
Events are yielded in file order: the shared time slice is time-ordered; the full public file
is not (sort it by the fifth column first, e.g. `sort -t, -k5,5n -s`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.replay import ReplayFormatError

SOURCE = "replay:taobao"
BEHAVIORS = {
    "pv": EventType.page_view,
    "cart": EventType.add_to_cart,
    "fav": EventType.favorite,
    "buy": EventType.purchase,
}


def read(path: Path) -> Iterator[Event]:
    """One event per line, in file order."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield _event(path, number, line)


def _event(path: Path, number: int, line: str) -> Event:
    fields = line.rstrip("\r\n").split(",")
    if len(fields) != 5:
        raise ReplayFormatError(path, number, f"expected 5 comma-separated fields, got {len(fields)}")
    user_id, item_id, category_id, behavior, timestamp = fields
    if behavior not in BEHAVIORS:
        raise ReplayFormatError(path, number, f"unknown behavior_type {behavior!r} (expected pv, cart, fav or buy)")
    try:
        ts = datetime.fromtimestamp(int(timestamp), tz=UTC)
    except ValueError as error:
        raise ReplayFormatError(path, number, f"timestamp {timestamp!r} is not unix seconds") from error
    return Event(
        event_id=f"taobao-{number}",
        schema_version=SCHEMA_VERSION,
        event_type=BEHAVIORS[behavior],
        user_id=user_id,
        ts=ts,
        item_id=item_id,
        category=category_id,
        source=SOURCE,
    )
