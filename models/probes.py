"""Scored events of the Globo protocol: each one's candidates and the live features of every candidate.

One pass over the clicks in time order. Before each scored event the state takes in exactly the clicks
strictly before it (score first, then reveal), so every feature is what an online system would have
held at that moment: clicks per article in the last hour (the candidate pool), exponentially decayed
clicks, all-time clicks, first and last click times, and the session-to-session transitions
"article b was clicked right after article a" that the co-occurrence votes read.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from models.globo import HOUR_MS, Clicks, Protocol

# The co-occurrence vote: the session's last clicks, most recent first, and each one's weight.
VOTE_WEIGHTS = (1.0, 0.5, 0.25)
NEVER = np.iinfo(np.int64).max  # first click of an article not clicked yet
COOC_HALF_LIFE_MS = 2 * HOUR_MS
NEAR = 3  # "followed within NEAR clicks" of the near co-occurrence
SHORT_MS = 10 * 60_000  # the short popularity window
HISTORY = 10  # the session's last clicks kept per event (the sequence model reads them)
FEATURES = [
    "pop_1h",  # clicks on the candidate in the hour before the event (the pool's weights)
    "pop_decayed",  # clicks decayed with `half_life_ms`, all earlier clicks
    "pop_total",  # all clicks before the event
    "pop_1h_share",  # pop_1h / the pool's clicks: popularity relative to the moment's traffic
    "age_h",  # hours since the candidate's first click (0 when it has none yet)
    "since_last_min",  # minutes since the candidate's last click (NaN when it has none yet)
    "cooc_last",  # times the candidate followed the session's last click in earlier sessions
    "cooc_last_share",  # cooc_last / all transitions out of the session's last click
    "cooc_vote",  # the session kNN vote: sum over the last clicks of VOTE_WEIGHTS x transitions
    "cooc_in",  # transitions into the candidate from anything (how often it is a "next" click)
    "cooc_last_vs_in",  # cooc_last / cooc_in: how specific the transition is to the last click
    "cooc_last_decayed",  # cooc_last with each transition decayed by `COOC_HALF_LIFE_MS` (news moves fast)
    "cooc_near_vote",  # the vote over "followed within NEAR clicks" instead of "right after"
    "pop_10m",  # clicks on the candidate in the 10 minutes before the event
    "gap_min",  # minutes since the session's last click (same for every candidate of an event)
    "session_length",  # earlier clicks in the session (same for every candidate of an event)
]


@dataclass
class Probes:
    """Scored events; column 0 of every (E, C) array is the clicked article."""

    events: np.ndarray  # (E,) click indices
    candidates: np.ndarray  # (E, C) dense article indices, -1 pads events with a pool smaller than C - 1
    features: dict[str, np.ndarray]  # name -> (E, C) float64
    history: np.ndarray  # (E, HISTORY) the session's earlier clicks, most recent first, -1 padded
    in_pool: np.ndarray  # (E,) whether the clicked article was clicked by anyone in the pool's window
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (E,) event times

    @property
    def mask(self) -> np.ndarray:
        return self.candidates >= 0

    def select(self, rows: np.ndarray) -> Probes:
        return Probes(self.events[rows], self.candidates[rows], {k: v[rows] for k, v in self.features.items()},
                      self.history[rows], self.in_pool[rows], self.ts[rows])  # fmt: skip


def build_probes(clicks: Clicks, events: np.ndarray, protocol: Protocol, *, half_life_ms: int = HOUR_MS) -> Probes:
    """Candidates and features of `events` (click indices, any order; returned in time order)."""
    events = np.sort(np.asarray(events, dtype=np.int64))
    n_items, width = clicks.n_items, protocol.negatives + 1
    ts, item = clicks.ts, clicks.item
    previous = np.stack([_previous_item(clicks, k) for k in range(1, NEAR + 1)], axis=1)  # (n, NEAR)
    state = _State(n_items)
    candidates = np.full((len(events), width), -1, dtype=np.int64)
    feats = {name: np.zeros((len(events), width)) for name in FEATURES}
    in_pool = np.zeros(len(events), dtype=bool)
    history = clicks.history(events, HISTORY)
    lo = hi = short = 0
    decay = np.log(2) / half_life_ms
    for e, index in enumerate(events):
        t = int(ts[index])
        new_hi = int(np.searchsorted(ts, t, side="left"))  # clicks strictly before the event
        new_lo = int(np.searchsorted(ts, t - protocol.window_ms, side="left"))
        state.reveal(item[hi:new_hi], ts[hi:new_hi], previous[hi:new_hi], t, decay)
        new_short = int(np.searchsorted(ts, t - SHORT_MS, side="left"))
        state.forget(item[lo:new_lo], item[short:new_short])
        lo, hi, short = new_lo, new_hi, new_short
        session = clicks.session_order[
            clicks.session_start[index] : clicks.session_start[index] + clicks.position[index]
        ]
        own = item[session]
        target = int(item[index])
        in_pool[e] = state.hour[target] > 0
        # One generator per event: its candidates do not depend on which other events are scored.
        rng = np.random.default_rng((protocol.seed, int(index)))
        row = _draw(state.hour, np.append(own, target), protocol.negatives, rng)
        candidates[e, 0], candidates[e, 1 : 1 + len(row)] = target, row
        cands = candidates[e, : 1 + len(row)]
        last_ms = int(ts[session[-1]]) if len(session) else t
        for name, values in state.features(cands, history[e], t, int(clicks.position[index]), last_ms).items():
            feats[name][e, : len(cands)] = values
    return Probes(events, candidates, feats, history, in_pool, ts[events])


def _draw(hour: np.ndarray, exclude: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct articles of the pool (clicked in the window), drawn in proportion to their clicks."""
    pool = np.flatnonzero(hour)
    pool = pool[~np.isin(pool, exclude)]
    if len(pool) <= k:
        return pool
    weights = hour[pool].astype(float)
    return rng.choice(pool, size=k, replace=False, p=weights / weights.sum())


def _previous_item(clicks: Clicks, k: int = 1) -> np.ndarray:
    """(n,) the article of the click k before each click in its session; -1 where there is none."""
    out = np.full(len(clicks), -1, dtype=np.int64)
    later = clicks.position >= k
    at = clicks.session_start[later] + clicks.position[later] - k
    out[later] = clicks.item[clicks.session_order[at]]
    return out


class _State:
    """What the stream knows at a moment, advanced by slices of clicks (vectorised within a slice)."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.hour = np.zeros(n_items, dtype=np.int64)
        self.short = np.zeros(n_items, dtype=np.int64)
        self.decayed = np.zeros(n_items)
        self.decayed_at = 0
        self.total = np.zeros(n_items)
        self.first = np.full(n_items, NEVER, dtype=np.int64)
        self.last = np.full(n_items, -1, dtype=np.int64)
        self.transitions: Counter[int] = Counter()  # a * n_items + b -> times b followed a in a session
        self.out = np.zeros(n_items)  # transitions out of each article
        self.into = np.zeros(n_items)  # transitions into each article
        self.near: Counter[int] = Counter()  # a * n_items + b -> times b followed a within NEAR clicks
        self.recent: dict[int, list[float]] = {}  # a * n_items + b -> [decayed transitions, as of ms]
        self.cooc_decay = np.log(2) / COOC_HALF_LIFE_MS

    def reveal(self, items: np.ndarray, times: np.ndarray, previous: np.ndarray, now: int, decay: float) -> None:
        self.decayed *= np.exp(-(now - self.decayed_at) * decay)
        self.decayed_at = now
        if not len(items):
            return
        np.add.at(self.hour, items, 1)
        np.add.at(self.short, items, 1)
        np.add.at(self.total, items, 1)
        np.add.at(self.decayed, items, np.exp(-(now - times) * decay))
        np.minimum.at(self.first, items, times)
        np.maximum.at(self.last, items, times)
        follows = previous[:, 0] >= 0
        a, b = previous[follows, 0], items[follows]
        codes = (a * self.n_items + b).tolist()
        self.transitions.update(codes)
        np.add.at(self.out, a, 1)
        np.add.at(self.into, b, 1)
        for k in range(previous.shape[1]):
            near = previous[:, k] >= 0
            self.near.update((previous[near, k] * self.n_items + items[near]).tolist())
        rate, recent = self.cooc_decay, self.recent
        for code, at in zip(codes, times[follows].tolist(), strict=True):
            held = recent.get(code)
            if held is None:
                recent[code] = [1.0, at]
            else:
                held[0] = held[0] * math.exp(-(at - held[1]) * rate) + 1.0
                held[1] = at

    def forget(self, hour: np.ndarray, short: np.ndarray) -> None:
        """Clicks that left the hour window and the short window."""
        np.subtract.at(self.hour, hour, 1)
        np.subtract.at(self.short, short, 1)

    def features(self, cands: np.ndarray, history: np.ndarray, now: int, length: int,
                 last_ms: int) -> dict[str, np.ndarray]:  # fmt: skip
        pool_clicks = max(int(self.hour.sum()), 1)
        n = len(cands)
        votes, near_votes, last, decayed = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        get, near, ids = self.transitions.get, self.near.get, cands.tolist()
        for weight, previous in zip(VOTE_WEIGHTS, history, strict=False):
            if previous < 0:
                break
            base = int(previous) * self.n_items
            counts = np.fromiter((get(base + c, 0) for c in ids), float, n)
            votes += weight * counts
            near_votes += weight * np.fromiter((near(base + c, 0) for c in ids), float, n)
            if weight == VOTE_WEIGHTS[0]:
                last = counts
                rate = self.cooc_decay
                for j, c in enumerate(ids):
                    held = self.recent.get(base + c)
                    if held is not None:
                        decayed[j] = held[0] * math.exp(-(now - held[1]) * rate)
        first, seen = self.first[cands], self.last[cands]
        return {
            "pop_1h": self.hour[cands].astype(float),
            "pop_decayed": self.decayed[cands],
            "pop_total": self.total[cands],
            "pop_1h_share": self.hour[cands] / pool_clicks,
            "age_h": np.where(first < NEVER, (now - first) / HOUR_MS, 0.0),
            "since_last_min": np.where(seen >= 0, (now - seen) / 60_000, np.nan),
            "cooc_last": last,
            "cooc_last_share": last / max(self.out[history[0]], 1.0) if history[0] >= 0 else last,
            "cooc_vote": votes,
            "cooc_in": self.into[cands],
            "cooc_last_vs_in": last / np.maximum(self.into[cands], 1.0),
            "cooc_last_decayed": decayed,
            "cooc_near_vote": near_votes,
            "pop_10m": self.short[cands].astype(float),
            "gap_min": np.full(n, (now - last_ms) / 60_000),
            "session_length": np.full(n, float(length)),
        }
