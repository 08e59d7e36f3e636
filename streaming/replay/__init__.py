"""Replaying data sets as clickstream events: one module per file format, each `read(path)`.

Every reader is a generator of `Event`s in event-time order (JSONL: in file order, and raw
`bytes` for lines that break the contract). `source` is `replay:<format>`.

Event ids come from what a record says and where it comes from (`RecordIds`): a digest of the
format, the record's bytes (a line, without its line break) and the event's role in it (MIND and
OBD rows give several events), never its line number or the file's path. So the same record
replayed again (the same file twice, or two exports that overlap) gets the same ids and the
consumer applies it once, while two different files (the first and the last lines of a data set)
both apply. A line repeated byte for byte within a file (the same user, item and second) is
numbered by its occurrence, so both apply; repeats more than `REPEAT_WINDOW` distinct lines
apart get the same id and the consumer counts the later one as a duplicate.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from streaming.events import Event

FORMATS = ("taobao", "mind", "obd", "jsonl", "globo")
DIGEST_BYTES = 10  # 80 bits: a collision among 10^8 records has odds ~4e-9
REPEAT_WINDOW = 1 << 16  # distinct recent lines whose repeats are numbered (bounded memory)


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


class RecordIds:
    """Event ids of one file's records in one format: `<format>-<20 hex digits>`, from content only."""

    def __init__(self, format: str, *, scope: bytes = b"") -> None:
        # `scope`: what the record means beyond its bytes (OBD's policy and campaign, named by the folders)
        self.prefix = f"{format}-"
        self.salt = format.encode() + b"\x00" + scope + b"\x00"
        self.recent: OrderedDict[bytes, int] = OrderedDict()  # line digest -> times seen so far

    def of(self, record: bytes) -> str:
        """The id of the next record with these bytes (the k-th repeat of a line gets its own id)."""
        digest = _digest(self.salt + record)
        repeats = self.recent.pop(digest, 0)
        self.recent[digest] = repeats + 1
        if len(self.recent) > REPEAT_WINDOW:
            self.recent.popitem(last=False)
        if repeats:
            digest = _digest(self.salt + record + b"\x00" + str(repeats).encode())
        return self.prefix + digest.hex()

    def plain(self, *parts: str) -> str:
        """An id from named parts that are the record's identity themselves (never numbered)."""
        return self.prefix + _digest(self.salt + "\x00".join(parts).encode()).hex()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


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
