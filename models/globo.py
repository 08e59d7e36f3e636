"""The Globo next-in-session protocol: the click reader, the probes (scored events and their candidates)
and the metrics with intervals.

An evaluated event is a click whose session already had an earlier click. Its candidates are the
clicked article plus `negatives` articles drawn (seeded, without replacement) from the distinct
articles clicked by anyone in the hour before it, in proportion to their clicks in that hour, the
session's own clicks excluded. Everything a scorer may read about an event is computed from the clicks
strictly before it (prequential: score first, then reveal), in `models.sequence_features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
COLUMNS = {"session_id": "int64", "click_article_id": "int64", "click_timestamp": "int64", "user_id": "int64"}


@dataclass(frozen=True)
class Clicks:
    """A click log in time order, ids mapped to dense indices (arrays of one length, one row per click)."""

    ts: np.ndarray  # (n,) int64 unix ms, non-decreasing
    item: np.ndarray  # (n,) int64 dense article index; `articles[item]` is the original id
    session: np.ndarray  # (n,) int64 dense session index
    position: np.ndarray  # (n,) int64 rank of the click in its session (0 = first), by time
    session_order: np.ndarray  # (n,) int64: click indices sorted by (session, position)
    session_start: np.ndarray  # (n,) int64: where each click's session begins in `session_order`
    articles: np.ndarray  # (n_items,) original article ids

    @property
    def n_items(self) -> int:
        return len(self.articles)

    def __len__(self) -> int:
        return len(self.ts)

    def history(self, index: np.ndarray, length: int) -> np.ndarray:
        """(len(index), length) the last `length` earlier clicks of each click's session, most recent first;
        -1 pads sessions with fewer."""
        index = np.asarray(index, dtype=np.int64)
        # Where each click sits in session_order: its session's start plus its position.
        at = self.session_start[index] + self.position[index]
        steps = np.arange(1, length + 1)  # (length,)
        src = at[:, None] - steps[None, :]  # (E, length)
        valid = steps[None, :] <= self.position[index][:, None]
        out = np.full(src.shape, -1, dtype=np.int64)
        out[valid] = self.item[self.session_order[src[valid]]]
        return out


def read_clicks(path: str | Path) -> Clicks:
    """The Globo clicks file (`clicks.csv.gz` or any file with its columns), in time order."""
    frame = pd.read_csv(path, usecols=list(COLUMNS), dtype=COLUMNS)
    return clicks_from_frame(frame)


def clicks_from_frame(frame: pd.DataFrame) -> Clicks:
    frame = frame.sort_values("click_timestamp", kind="stable").reset_index(drop=True)
    ts = frame["click_timestamp"].to_numpy(np.int64)
    articles, item = np.unique(frame["click_article_id"].to_numpy(), return_inverse=True)
    _, session = np.unique(frame["session_id"].to_numpy(), return_inverse=True)
    session_order = np.lexsort((np.arange(len(ts)), session))  # by session, then by time (ts already sorted)
    sorted_sessions = session[session_order]
    first = np.r_[True, sorted_sessions[1:] != sorted_sessions[:-1]]
    start_in_order = np.maximum.accumulate(np.where(first, np.arange(len(ts)), 0))
    position = np.empty(len(ts), dtype=np.int64)
    position[session_order] = np.arange(len(ts)) - start_in_order
    session_start = np.empty(len(ts), dtype=np.int64)
    session_start[session_order] = start_in_order
    return Clicks(ts=ts, item=item.astype(np.int64), session=session.astype(np.int64), position=position,
                  session_order=session_order, session_start=session_start, articles=articles)  # fmt: skip


@dataclass(frozen=True)
class Protocol:
    """What is evaluated and how its candidates are drawn."""

    eval_from: str | None = None  # first evaluated UTC day (YYYY-MM-DD); None: the last `eval_days` days
    eval_days: int = 2  # evaluated calendar days, from `eval_from`
    sample: float = 0.1  # share of the eligible events scored (seeded); 1.0 scores all
    negatives: int = 50  # sampled negatives per event
    window_ms: int = HOUR_MS  # the pool: articles clicked in this window before the event
    seed: int = 0

    def eval_window(self, clicks: Clicks) -> tuple[int, int]:
        """[from, to) unix ms of the evaluated days."""
        if self.eval_from is None:
            start = (int(clicks.ts[-1]) // DAY_MS - self.eval_days + 1) * DAY_MS
        else:
            start = int(datetime.fromisoformat(self.eval_from).replace(tzinfo=UTC).timestamp() * 1000)
        return start, start + self.eval_days * DAY_MS


def eligible(clicks: Clicks, start_ms: int, end_ms: int) -> np.ndarray:
    """Indices of the next-in-session clicks (position > 0) in [start_ms, end_ms)."""
    return np.flatnonzero((clicks.position > 0) & (clicks.ts >= start_ms) & (clicks.ts < end_ms))


def sample_events(events: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A seeded `share` of `events` (all of them when share >= 1), in time order."""
    if share >= 1:
        return events
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(events, size=round(len(events) * share), replace=False))


# --- metrics ------------------------------------------------------------------------------------------


def event_metrics(scores: np.ndarray, mask: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per event HR@k, reciprocal rank @k and AUC; column 0 of `scores` (E, C) is the clicked article,
    `mask` marks real candidates. Ties are broken uniformly at random, in expectation (a constant scorer
    gets random's figures, not the best or worst rank)."""
    pos = scores[:, :1]
    neg = mask[:, 1:]
    greater = ((scores[:, 1:] > pos) & neg).sum(axis=1)  # (E,)
    ties = ((scores[:, 1:] == pos) & neg).sum(axis=1)
    n_neg = neg.sum(axis=1)
    hr = np.clip((k - greater) / (ties + 1), 0.0, 1.0)
    ranks = np.arange(1, k + 1)[None, :]  # (1, k)
    reachable = (ranks >= greater[:, None] + 1) & (ranks <= (greater + ties)[:, None] + 1)
    rr = (reachable / ranks).sum(axis=1) / (ties + 1)
    auc = (n_neg - greater - 0.5 * ties) / np.maximum(n_neg, 1)
    return {"hr@10" if k == 10 else f"hr@{k}": hr, "mrr@10" if k == 10 else f"mrr@{k}": rr, "auc": auc}


def mean_interval(values: np.ndarray, clusters: np.ndarray | None = None) -> tuple[float, float]:
    """(mean, half-width of its 95% normal interval). With `clusters` (the session of each event) the
    standard error is cluster-robust: events of one session share a reader and are not independent."""
    values = np.asarray(values, dtype=float)
    n = values.size
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan")
    if clusters is None:
        return mean, float(1.96 * values.std(ddof=1) / np.sqrt(n))
    _, group = np.unique(clusters, return_inverse=True)
    sums = np.bincount(group, weights=values - mean)
    g = sums.size
    if g < 2:
        return mean, float("nan")
    return mean, float(1.96 * np.sqrt((sums**2).sum() * g / (g - 1)) / n)


METRICS = ["hr@10", "mrr@10", "auc"]


def summarise(per_event: dict[str, np.ndarray], clusters: np.ndarray) -> dict[str, tuple[float, float]]:
    return {m: mean_interval(per_event[m], clusters) for m in METRICS}


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], clusters: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean per-event difference a - b for each metric, with its (cluster-robust) 95% half-width."""
    return {m: mean_interval(a[m] - b[m], clusters) for m in METRICS}


def format_table(rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    lines = ["| scorer | HR@10 | MRR@10 | AUC |", "| --- | ---: | ---: | ---: |"]
    for name, row in rows.items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paired(rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    lines = ["| difference (same events) | HR@10 | MRR@10 | AUC |", "| --- | ---: | ---: | ---: |"]
    for name, row in rows.items():
        cells = [f"{row[m][0]:+.3f} ± {row[m][1]:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
