"""Scored events of the Globo protocol: each one's candidates and the live features of every candidate.

One pass over the clicks in time order. Before each scored event the state takes in exactly the clicks
strictly before it (score first, then reveal), so every feature is what an online system would have
held at that moment. The features are `features.article_flow`'s: the same click counters, rows and
feature functions as the consumer keeps in Redis through Feast, here summed in memory. The protocol's
own pool (clicks per article in the exact hour before the event) draws the negatives and is the
"popularity, last hour" baseline (`pool_1h`); it is not a ranker feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.article_flow import FEATURES as FLOW_FEATURES
from features.article_flow import NEAR, FlowCounters, candidate_features, click_counters
from models.globo import Clicks, Protocol

HISTORY = 10  # the session's last clicks kept per event (the sequence model reads them)
POOL = "pool_1h"  # clicks on the candidate in the exact hour before the event (the pool's weights)
FEATURES = list(FLOW_FEATURES)


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


def build_probes(clicks: Clicks, events: np.ndarray, protocol: Protocol) -> Probes:
    """Candidates and features of `events` (click indices, any order; returned in time order)."""
    events = np.sort(np.asarray(events, dtype=np.int64))
    n_items, width = clicks.n_items, protocol.negatives + 1
    ts, item = clicks.ts, clicks.item
    # The session's NEAR earlier clicks of every click, newest last (what a user's state holds).
    previous = np.stack([_previous_item(clicks, k) for k in range(NEAR, 0, -1)], axis=1).tolist()
    flow = FlowCounters()
    hour = np.zeros(n_items, dtype=np.int64)  # the pool: clicks in the exact window before the event
    candidates = np.full((len(events), width), -1, dtype=np.int64)
    feats = {name: np.zeros((len(events), width)) for name in [*FEATURES, POOL]}
    in_pool = np.zeros(len(events), dtype=bool)
    history = clicks.history(events, HISTORY)
    lo = hi = 0
    items, times = item.tolist(), ts.tolist()
    for e, index in enumerate(events):
        t = int(ts[index])
        new_hi = int(np.searchsorted(ts, t, side="left"))  # clicks strictly before the event
        new_lo = int(np.searchsorted(ts, t - protocol.window_ms, side="left"))
        for k in range(hi, new_hi):
            flow.add(click_counters([p for p in previous[k] if p >= 0], items[k], times[k]))
        np.add.at(hour, item[hi:new_hi], 1)
        np.subtract.at(hour, item[lo:new_lo], 1)
        lo, hi = new_lo, new_hi
        length = int(clicks.position[index])
        session = clicks.session_order[clicks.session_start[index] : clicks.session_start[index] + length]
        own = item[session]
        target = int(item[index])
        in_pool[e] = hour[target] > 0
        # One generator per event: its candidates do not depend on which other events are scored.
        rng = np.random.default_rng((protocol.seed, int(index)))
        row = _draw(hour, np.append(own, target), protocol.negatives, rng)
        candidates[e, 0], candidates[e, 1 : 1 + len(row)] = target, row
        cands = candidates[e, : 1 + len(row)].tolist()
        recent = own[-NEAR:].tolist()
        last_ms = int(ts[session[-1]]) if length else t
        articles, transitions = flow.rows_for(cands, recent)
        values = candidate_features(cands, articles, transitions, recent, length, last_ms, t)
        for name, column in values.items():
            feats[name][e, : len(cands)] = column
        feats[POOL][e, : len(cands)] = hour[cands]
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
