"""Article flow: what readers click, and what they click next, as counters kept online.

A click is a `page_view` of an item within a session. It adds to its article's counters and to the
transitions "b was read right after a" (and "b within NEAR clicks after a") of its session. Pure steps:
  click_counters(previous, item, ts)  -> counter increments (hash -> field -> amount)
  article_row(fields), transition_row(fields, b) -> the Feast rows (`article_activity`,
                                         `article_transition`) of summed counters
  candidate_features(...)             -> the ranker's features of candidates at a moment
The consumer sums the counters over Kafka partitions in Redis and writes the rows through Feast's
layout; the Globo evaluation (`models.probes`) keeps the same counters in memory (`FlowCounters`).
One definition: training and serving read features computed by these functions only.

Counters of one hash are merged by their field's name (`merge_field`): `f` (first click) is a minimum,
`l` and `l:<b>` (last click, last transition to b) are maxima, every other field is a sum. Decayed sums
are integers in units of 1/SCALE kept per hour (popularity) or per day (transitions) relative to the
bucket's start, so that they add exactly in any order: a bucket's value at time t is
sum(2^((click - start) / half-life)) * 2^(-(t - start) / half-life).

Hash `art:<a>`: t clicks, i transitions into a, o transitions out of a, f / l first / last click ms,
`m:<minute>` clicks per minute, `d:<hour>` decayed clicks per hour.
Hash `next:<a>`: per follower b, `n:<b>` transitions a -> b, `r:<b>` b within NEAR clicks after a,
`l:<b>` the last such ms, `x:<day>:<b>` decayed transitions a -> b per day.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
NEAR = 3  # "followed within NEAR clicks" of the near transitions
SESSION_ITEMS = 10  # the session's last clicks a user's state keeps (the sequence model reads 5)
VOTE_WEIGHTS = (1.0, 0.5, 0.25)  # the co-occurrence vote: the session's last clicks, most recent first
POP_HALF_LIFE_MS = HOUR_MS
COOC_HALF_LIFE_MS = 2 * HOUR_MS
POP_HOURS = 24  # hourly decayed sums read (older clicks weigh < 2^-23)
COOC_DAYS = 2  # daily decayed transition sums read (older ones weigh < 2^-12)
WINDOW_MINUTES = 60  # minute counters read: the last hour
SHORT_MINUTES = 10
SCALE = 1_000_000  # decayed sums are integers of 1/SCALE: HINCRBY adds them exactly in any order

ARTICLE = "art"
NEXT = "next"
Counters = dict[tuple[str, Hashable], dict[str, int]]  # (ARTICLE | NEXT, article) -> field -> amount

FEATURES = [
    "pop_1h",  # clicks on the candidate in the last 60 minute buckets
    "pop_10m",  # ... in the last 10 minute buckets
    "pop_decayed",  # clicks decayed with a 1 h half-life (the last 24 hourly sums)
    "pop_total",  # all clicks
    "age_h",  # hours since the candidate's first click (0 when it has none)
    "since_last_min",  # minutes since its last click (NaN when it has none)
    "cooc_last",  # times the candidate followed the session's last click
    "cooc_last_share",  # cooc_last / transitions out of the session's last click
    "cooc_vote",  # session kNN vote: sum over the last clicks of VOTE_WEIGHTS x transitions
    "cooc_in",  # transitions into the candidate from anything
    "cooc_last_vs_in",  # cooc_last / cooc_in: how specific the transition is to the last click
    "cooc_last_decayed",  # cooc_last decayed with a 2 h half-life (the last 2 daily sums)
    "cooc_near_vote",  # the vote over "followed within NEAR clicks"
    "gap_min",  # minutes since the session's last click (same for every candidate)
    "session_length",  # earlier clicks in the session (same for every candidate)
]
ARTICLE_ROW = ("clicks_total", "first_click_ms", "last_click_ms", "transitions_in", "transitions_out",
               "minute_buckets", "minute_clicks", "clicks_decayed")  # fmt: skip
TRANSITION_ROW = ("transitions", "transitions_near", "transitions_decayed", "transition_last_ms")


def pair_id(a: Hashable, b: Hashable) -> str:
    """The `article_transition` entity of a -> b (ids hold no space: Kafka keys and Globo ids alike)."""
    return f"{a} {b}"


def click_counters(previous: Sequence[Hashable], item: Hashable, ts: int) -> Counters:
    """The increments of one click of `item` at `ts`; `previous`: the session's earlier clicks, newest last."""
    hour, day = ts // HOUR_MS, ts // DAY_MS
    art = {"t": 1, "f": ts, "l": ts, f"m:{ts // MINUTE_MS}": 1,
           f"d:{hour}": _weight(ts - hour * HOUR_MS, POP_HALF_LIFE_MS)}  # fmt: skip
    out: Counters = {(ARTICLE, item): art}
    if not previous:
        return out
    last = previous[-1]
    art["i"] = 1
    out.setdefault((ARTICLE, last), {})["o"] = 1
    follows = out.setdefault((NEXT, last), {})
    follows.update({f"n:{item}": 1, f"x:{day}:{item}": _weight(ts - day * DAY_MS, COOC_HALF_LIFE_MS)})
    for earlier in previous[-NEAR:]:  # the last click among them: every a -> b is also near
        fields = out.setdefault((NEXT, earlier), {})
        fields[f"r:{item}"] = fields.get(f"r:{item}", 0) + 1
        fields[f"l:{item}"] = ts
    return out


def merge_field(fields: dict[str, int], name: str, value: int) -> None:
    """Merge one counter into a hash's fields by the field's rule (minimum, maximum or sum)."""
    held = fields.get(name)
    if held is None:
        fields[name] = value
    elif name == "f":
        fields[name] = min(held, value)
    elif name == "l" or name.startswith("l:"):
        fields[name] = max(held, value)
    else:
        fields[name] = held + value


def field_op(name: str) -> str:
    """How Redis merges this field: 'min', 'max' or 'add' (`merge_field`'s rule)."""
    if name == "f":
        return "min"
    return "max" if name == "l" or name.startswith("l:") else "add"


def article_row(fields: Mapping[str, int]) -> dict[str, Any]:
    """The `article_activity` row of an article's summed counters, as of its last click."""
    last = int(fields.get("l", 0))
    low_minute, low_hour = last // MINUTE_MS - WINDOW_MINUTES, last // HOUR_MS - POP_HOURS
    minutes, decayed = [], 0.0
    for name, value in fields.items():
        kind = name[:2]
        if kind == "m:" and int(name[2:]) > low_minute:
            minutes.append((int(name[2:]), int(value)))
        elif kind == "d:" and (hour := int(name[2:])) > low_hour:
            decayed += value * 2.0 ** (-(last - hour * HOUR_MS) / POP_HALF_LIFE_MS)
    minutes.sort()
    return {"clicks_total": int(fields.get("t", 0)), "first_click_ms": int(fields.get("f", 0)),
            "last_click_ms": last, "transitions_in": int(fields.get("i", 0)),
            "transitions_out": int(fields.get("o", 0)), "minute_buckets": [m for m, _ in minutes],
            "minute_clicks": [c for _, c in minutes], "clicks_decayed": decayed / SCALE}  # fmt: skip


def stale_article_fields(fields: Mapping[str, int]) -> list[str]:
    """Minute and hour counters no row reads any more (the article's last click moved past them)."""
    last = int(fields.get("l", 0))
    low_minute, low_hour = last // MINUTE_MS - WINDOW_MINUTES, last // HOUR_MS - POP_HOURS
    return [name for name in fields if (name[:2] == "m:" and int(name[2:]) <= low_minute)
            or (name[:2] == "d:" and int(name[2:]) <= low_hour)]  # fmt: skip


def transition_fields(b: Hashable) -> list[str]:
    """The fields of `next:<a>` that a -> b's row reads besides its daily sums (`decay_fields`)."""
    return [f"n:{b}", f"r:{b}", f"l:{b}"]


def decay_fields(b: Hashable, last_ms: int) -> list[str]:
    """The daily sums of a -> b that its row reads when its last follow is at `last_ms`."""
    day = last_ms // DAY_MS
    return [f"x:{d}:{b}" for d in range(day - COOC_DAYS + 1, day + 1)]


def transition_row(fields: Mapping[str, int], b: Hashable) -> dict[str, Any]:
    """The `article_transition` row of a -> b from the summed fields of a's `next` hash."""
    last = int(fields.get(f"l:{b}", 0))
    decayed = 0.0
    for name in decay_fields(b, last):
        value = fields.get(name)
        if value:
            start = int(name.split(":", 2)[1]) * DAY_MS
            decayed += value * 2.0 ** (-(last - start) / COOC_HALF_LIFE_MS)
    return {"transitions": int(fields.get(f"n:{b}", 0)), "transitions_near": int(fields.get(f"r:{b}", 0)),
            "transitions_decayed": decayed / SCALE, "transition_last_ms": last}  # fmt: skip


def followers(fields: Mapping[str, int]) -> list[str]:
    """The b's whose a -> b counters these fields of `next:<a>` hold (every follower has an `r:<b>`)."""
    return [name[2:] for name in fields if name[:2] == "r:"]


def stale_transition_fields(b: Hashable, last_ms: int) -> list[str]:
    """Daily sums of a -> b that no row reads once its last follow is at `last_ms` (the few days before)."""
    day = last_ms // DAY_MS
    return [f"x:{d}:{b}" for d in range(day - COOC_DAYS - 2, day - COOC_DAYS + 1)]


def article_features(row: Mapping[str, Any] | None, now: int) -> tuple[float, ...]:
    """(pop_1h, pop_10m, pop_decayed, pop_total, age_h, since_last_min, cooc_in) of one article at `now`."""
    if not row or not row.get("clicks_total"):
        return 0.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 0.0
    minute = now // MINUTE_MS
    hour = short = 0
    for bucket, count in zip(row["minute_buckets"], row["minute_clicks"], strict=True):
        if minute - WINDOW_MINUTES < bucket <= minute:
            hour += count
            short += count if bucket > minute - SHORT_MINUTES else 0
    last = row["last_click_ms"]
    decayed = row["clicks_decayed"] * 2.0 ** (-(now - last) / POP_HALF_LIFE_MS)
    return (float(hour), float(short), decayed, float(row["clicks_total"]), (now - row["first_click_ms"]) / HOUR_MS,
            (now - last) / MINUTE_MS, float(row["transitions_in"]))  # fmt: skip


def transition_decayed(row: Mapping[str, Any] | None, now: int) -> float:
    if not row or not row.get("transitions"):
        return 0.0
    return row["transitions_decayed"] * 2.0 ** (-(now - row["transition_last_ms"]) / COOC_HALF_LIFE_MS)


def candidate_features(
    candidates: Sequence[Hashable],
    articles: Mapping[Hashable, Mapping[str, Any]],
    transitions: Mapping[str, Mapping[str, Any]],
    session: Sequence[Hashable],
    session_length: int,
    session_last_ms: int,
    now: int,
) -> dict[str, np.ndarray]:
    """FEATURES of each candidate at `now` for a session of `session_length` clicks so far, the latest ones
    `session` (newest last). `articles`: article rows by id (candidates and the session's last click);
    `transitions`: rows by `pair_id(a, b)` for a among the session's last clicks and b among the candidates
    (missing: none)."""
    n = len(candidates)
    per = np.array([article_features(articles.get(c), now) for c in candidates], dtype=float).reshape(n, 7)
    votes, near, last, decayed = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    recent = list(reversed(session[-len(VOTE_WEIGHTS) :]))
    for k, (weight, a) in enumerate(zip(VOTE_WEIGHTS, recent, strict=False)):
        rows = [transitions.get(pair_id(a, c)) for c in candidates]
        counts = np.array([r["transitions"] if r else 0 for r in rows], dtype=float)
        votes += weight * counts
        near += weight * np.array([r["transitions_near"] if r else 0 for r in rows], dtype=float)
        if k == 0:
            last = counts
            decayed = np.array([transition_decayed(r, now) for r in rows], dtype=float)
    out_of_last = (articles.get(recent[0]) or {}).get("transitions_out", 0) if recent else 0
    return {
        "pop_1h": per[:, 0], "pop_10m": per[:, 1], "pop_decayed": per[:, 2], "pop_total": per[:, 3],
        "age_h": per[:, 4], "since_last_min": per[:, 5], "cooc_last": last,
        "cooc_last_share": last / max(out_of_last, 1), "cooc_vote": votes, "cooc_in": per[:, 6],
        "cooc_last_vs_in": last / np.maximum(per[:, 6], 1.0), "cooc_last_decayed": decayed,
        "cooc_near_vote": near,
        "gap_min": np.full(n, (now - session_last_ms) / MINUTE_MS if session_length else 0.0),
        "session_length": np.full(n, float(session_length)),
    }  # fmt: skip


class FlowCounters:
    """The counters of one place (the evaluation's memory): `add` merges increments, the rows are read back
    with the same functions as the consumer's sums over Redis."""

    def __init__(self, prune_above: int = 256) -> None:
        self.hashes: Counters = {}
        self.prune_above = prune_above  # an article hash with more fields drops the stale ones

    def add(self, counters: Counters) -> None:
        for key, fields in counters.items():
            held = self.hashes.setdefault(key, {})
            for name, value in fields.items():
                merge_field(held, name, value)
            if key[0] == ARTICLE and len(held) > self.prune_above:
                for name in stale_article_fields(held):
                    del held[name]

    def article(self, a: Hashable) -> dict[str, Any] | None:
        fields = self.hashes.get((ARTICLE, a))
        return article_row(fields) if fields else None

    def transition(self, a: Hashable, b: Hashable) -> dict[str, Any] | None:
        fields = self.hashes.get((NEXT, a))
        if not fields or f"r:{b}" not in fields:
            return None
        return transition_row(fields, b)

    def rows_for(
        self, candidates: Iterable[Hashable], session: Sequence[Hashable]
    ) -> tuple[dict[Hashable, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The article and transition rows `candidate_features` reads for these candidates and session."""
        cands = list(candidates)
        recent = session[-len(VOTE_WEIGHTS) :]
        articles = {a: row for a in {*cands, *recent[-1:]} if (row := self.article(a))}
        transitions = {pair_id(a, b): row for a in set(recent) for b in cands if (row := self.transition(a, b))}
        return articles, transitions


def _weight(offset_ms: int, half_life_ms: int) -> int:
    return round(SCALE * 2.0 ** (offset_ms / half_life_ms))
