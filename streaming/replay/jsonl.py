"""Events already in the contract, one JSON object per line (what `adloop simulate --out` writes).

Lines are yielded in file order (the producer of the file decides the order). A line that
breaks the contract is NOT dropped: it is yielded as its raw bytes (without the line break) and
logged with its line number and reason, so `produce_events` sends it unchanged and the
consumer dead-letters it with the same reason, where operators already look for bad events.
Blank lines are not events and are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from streaming.events import Event, InvalidEvent, parse_event

log = logging.getLogger(__name__)


def read(path: Path) -> Iterator[Event | bytes]:
    """Each line as an `Event`, or as raw `bytes` when it does not parse or validate."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield parse_event(raw)
            except InvalidEvent as error:
                log.warning("%s:%d: invalid event (%s), sent as is for the dead-letter topic", path, number, error)
                yield raw
