"""Replaying data sets as clickstream events: one module per file format, each `read(path)`.

Every reader is a generator of `Event`s in event-time order (JSONL: in file order, and raw
`bytes` for lines that break the contract). Event ids are derived from the file (line number,
impression id, ...), so replaying a file twice produces the same ids and the consumer applies
each event once. `source` is `replay:<format>`.
"""

from __future__ import annotations

import heapq
import importlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from streaming.events import Event

FORMATS = ("taobao", "mind", "obd", "jsonl", "globo")


class ReplayFormatError(ValueError):
    """A line of a data-set file that does not have the format's shape (the replay stops on it)."""

    def __init__(self, path: Path | str, line: int, detail: str) -> None:
        super().__init__(f"{path}:{line}: {detail}")
        self.path, self.line, self.detail = str(path), line, detail


def read(path: Path | str, format: str) -> Iterator[Event | bytes]:
    """The events of the file at `path` in the named format (one of `FORMATS`)."""
    if format not in FORMATS:
        raise ValueError(f"unknown replay format {format!r}; choose one of: {', '.join(FORMATS)}")
    module = importlib.import_module(f"streaming.replay.{format}")
    return module.read(Path(path))


def in_time_order(groups: Iterable[tuple[list[Event], list[Event]]]) -> Iterator[Event]:
    """Merge `(now, later)` groups into one time-ordered stream.

    `now` events come in non-decreasing time across groups and are yielded at once; `later`
    events (a click a moment after its impression) wait until no earlier event can follow.
    """
    pending: list[tuple[datetime, int, Event]] = []
    seq = 0
    for now, later in groups:
        for event in now:
            while pending and pending[0][0] <= event.ts:
                yield heapq.heappop(pending)[2]
            yield event
        for event in later:
            heapq.heappush(pending, (event.ts, seq, event))
            seq += 1
    while pending:
        yield heapq.heappop(pending)[2]
