"""Taobao UserBehavior (Alibaba Tianchi): `user_id,item_id,category_id,behavior_type,timestamp` CSV, no header.

Behaviours map to the contract as pv -> page_view, cart -> add_to_cart, fav -> favorite,
buy -> purchase; `timestamp` is unix seconds. Event ids are `taobao-<digest of the line>` (see
`streaming.replay.RecordIds`: the same line in another file is the same event).
Events are yielded in file order: the shared time slice is time-ordered; the full public file
is not (sort it by the fifth column first, e.g. `sort -t, -k5,5n -s`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.replay import RecordIds, ReplayFormatError

SOURCE = "replay:taobao"
BEHAVIORS = {
    "pv": EventType.page_view,
    "cart": EventType.add_to_cart,
    "fav": EventType.favorite,
    "buy": EventType.purchase,
}


def read(path: Path) -> Iterator[Event]:
    """One event per line, in file order."""
    ids = RecordIds("taobao")
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            raw = line.rstrip(b"\r\n")
            if raw.strip():
                yield _event(path, number, raw, ids)


def _event(path: Path, number: int, raw: bytes, ids: RecordIds) -> Event:
    try:
        fields = raw.decode("utf-8").split(",")
    except UnicodeDecodeError as error:
        raise ReplayFormatError(path, number, f"not UTF-8: {error}") from error
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
        event_id=ids.of(raw),
        schema_version=SCHEMA_VERSION,
        event_type=BEHAVIORS[behavior],
        user_id=user_id,
        ts=ts,
        item_id=item_id,
        category=category_id,
        source=SOURCE,
    )
