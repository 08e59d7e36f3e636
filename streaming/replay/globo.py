"""Globo.com (G1) news clicks: `clicks.csv.gz` (or the CSV itself), comma separated, with a header.

Columns: user_id, session_id, session_start (ms), session_size, click_article_id, click_timestamp (unix ms),
click_environment, click_deviceGroup, click_os, click_country, click_region, click_referrer_type.
Each click is a `page_view` of user `user_id` on item `click_article_id` (the article), in session
`session_id`, at `click_timestamp`; the `click_*` codes go to `context` without their prefix
(`environment`, `deviceGroup`, `os`, `country`, `region`, `referrer_type`) as integers. Articles carry
no category (the release has no article metadata).

Event ids come from the record, not its position: `globo-` + a 10-byte BLAKE2b digest of the format
and the line's bytes (without its line break), so replaying the file again, or an export that overlaps
it, gives the same ids and the consumer applies each click once; a line repeated byte for byte (the same
user, article and millisecond) is the same click and counts once. The file is in time order; events are
yielded in file order.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.replay import ReplayFormatError

SOURCE = "replay:globo"
HEADER = ("user_id", "session_id", "session_start", "session_size", "click_article_id", "click_timestamp",
          "click_environment", "click_deviceGroup", "click_os", "click_country", "click_region",
          "click_referrer_type")  # fmt: skip
CONTEXT = tuple((n, name.removeprefix("click_")) for n, name in enumerate(HEADER) if name.startswith("click_") and
                name not in ("click_article_id", "click_timestamp"))  # fmt: skip
_SALT = b"globo\x00\x00"  # format, no scope: the ids of streaming.replay's content-derived scheme
DIGEST_BYTES = 10


def read(path: Path) -> Iterator[Event]:
    """One event per click line, in file order (gzip-compressed or plain)."""
    with _open(path) as lines:
        header = lines.readline().rstrip(b"\r\n").decode("utf-8", "replace")
        if tuple(header.split(",")) != HEADER:
            raise ReplayFormatError(path, 1, f"expected the header {','.join(HEADER)!r}, got {header[:200]!r}")
        for number, raw in enumerate(lines, start=2):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield _event(path, number, line)


def event_id(line: bytes) -> str:
    """The id of the click on this line (its bytes without the line break)."""
    return "globo-" + hashlib.blake2b(_SALT + line, digest_size=DIGEST_BYTES).hexdigest()


def _open(path: Path) -> IO[bytes]:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _event(path: Path, number: int, line: bytes) -> Event:
    fields = line.decode("utf-8", "replace").split(",")
    if len(fields) != len(HEADER):
        raise ReplayFormatError(path, number, f"expected {len(HEADER)} comma-separated fields, got {len(fields)}")
    try:
        ts = datetime.fromtimestamp(int(fields[5]) / 1000, tz=UTC)
        context = {name: int(fields[n]) for n, name in CONTEXT}
    except (ValueError, OverflowError, OSError) as error:
        raise ReplayFormatError(
            path, number, f"click_timestamp and click_* codes must be integers ({error})"
        ) from error
    if not fields[0] or not fields[4]:
        raise ReplayFormatError(path, number, "user_id and click_article_id must not be empty")
    return Event(
        event_id=event_id(line),
        schema_version=SCHEMA_VERSION,
        event_type=EventType.page_view,
        user_id=fields[0],
        ts=ts,
        session_id=fields[1] or None,
        item_id=fields[4],
        context=context,
        source=SOURCE,
    )
