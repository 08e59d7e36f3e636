"""When a model is refreshed on what was revealed since its last training.

One rule for both places that learn continuously: every `every_events` new events, or after
`every_minutes` with at least one new event. `adloop learn` applies it in wall-clock time to the
impressions on the events topic (`models.learn_service`); the Globo evaluation's test-then-train walk
applies it in event time to the clicks (`models.globo_eval`), so the refreshed rows of its table are
what the service's schedule would have produced on that log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MINUTE_MS = 60_000


@dataclass(frozen=True)
class RefreshPolicy:
    every_events: int
    every_minutes: float

    def __post_init__(self) -> None:
        if self.every_events < 1 or self.every_minutes <= 0:
            raise ValueError(f"a refresh policy needs every_events >= 1 and every_minutes > 0, got {self}")

    def due(self, new_events: int, minutes: float) -> str | None:
        """Why a refresh is due now ("events" or "time"), or None: `new_events` revealed since the last
        training, `minutes` since it."""
        if new_events >= self.every_events:
            return "events"
        if new_events > 0 and minutes >= self.every_minutes:
            return "time"
        return None

    def intervals(self, ts: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
        """The [lo, hi) event-time intervals of [start, end) after each of which the policy trains, for
        events at the sorted unix-ms times `ts`: an interval closes right after its `every_events`-th
        event, or at `every_minutes` past its start when it holds an event by then, else right after
        its first event. They tile [start, end); the last one may close at `end` before it is due."""
        out: list[tuple[int, int]] = []
        lo, span = start, int(self.every_minutes * MINUTE_MS)
        while lo < end:
            first = int(np.searchsorted(ts, lo))
            if first >= len(ts) or ts[first] >= end:
                out.append((lo, end))
                break
            nth = first + self.every_events - 1
            by_count = int(ts[nth]) + 1 if nth < len(ts) else end
            by_time = lo + span if ts[first] < lo + span else int(ts[first]) + 1
            hi = min(by_count, by_time, end)
            out.append((lo, hi))
            lo = hi
        return out
