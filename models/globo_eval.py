"""`adloop evaluate --data globo`: the baselines, the sequence model and the ranker on the same probes.

Time line (days before the evaluated ones are all training; nothing reads a click after its event):
  [eval - ranker_days - fit_days, eval - ranker_days)  the sequence model's first fit
  [eval - ranker_days, eval)                           test-then-train walk: the ranker's training events
                                                       are scored by the model as refreshed so far
  eval start                                           frozen: the model and the trees as they are now
  [eval start, eval end)                               the frozen model scores every event; the refreshed
                                                       one scores each refresh interval, then trains on it
                                                       (and the trees are retrained at each day boundary)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.baselines import BASELINES, baseline_scores
from models.globo import DAY_MS, Clicks, Protocol, eligible, event_metrics, paired, sample_events, summarise
from models.globo_ranker import ALL_FEATURES, EMBEDDING, GloboRanker, RankerConfig
from models.globo_version import load_version, save_version
from models.probes import Probes, build_probes
from models.refresh_policy import RefreshPolicy
from models.sequences import SequenceConfig, SequenceModel

NO_EMBEDDING = [f for f in ALL_FEATURES if f not in (EMBEDDING, "embedding_rank")]


@dataclass
class GloboConfig:
    protocol: Protocol = field(default_factory=Protocol)
    ranker_days: int = 2  # days before the evaluated ones whose events train the trees
    ranker_sample: float = 0.1  # share of those days' eligible events used as ranker training events
    fit_days: float = 2.0  # days before those whose clicks give the sequence model its first fit
    # test-then-train: the sequence model trains on what was revealed whenever `adloop learn`'s rule is due
    # (here in event time: 15 minutes with a click, or 5,000 clicks, whichever comes first)
    refresh: RefreshPolicy = field(default_factory=lambda: RefreshPolicy(every_events=5000, every_minutes=15))
    refresh_ranker: bool = True  # retrain the trees at each evaluated day's start on the revealed events
    sequence: SequenceConfig = field(default_factory=lambda: SequenceConfig(temperature=0.1))
    ranker: RankerConfig = field(default_factory=RankerConfig)


@dataclass
class GloboReport:
    rows: dict[str, dict[str, tuple[float, float]]]  # scorer -> metric -> (mean, 95% half-width)
    paired: dict[str, dict[str, tuple[float, float]]]  # "a - b" -> metric -> (mean difference, half-width)
    per_event: dict[str, dict[str, np.ndarray]]  # scorer -> metric -> (E,) values
    info: dict[str, Any]  # sizes, windows and timings


def evaluate_globo(clicks: Clicks, config: GloboConfig | None = None, *, save_to: Path | None = None) -> GloboReport:
    """The full table; with `save_to` (a registry folder) the frozen models are saved as a Globo version."""
    config = config or GloboConfig()
    protocol = config.protocol
    began = time.perf_counter()
    start, end = protocol.eval_window(clicks)
    ranker_start = start - config.ranker_days * DAY_MS
    eval_events = sample_events(eligible(clicks, start, end), protocol.sample, protocol.seed)
    train_events = sample_events(eligible(clicks, ranker_start, start), config.ranker_sample, protocol.seed + 1)
    probes = build_probes(clicks, np.concatenate([train_events, eval_events]), protocol)
    is_eval = probes.ts >= start
    held, train = probes.select(np.flatnonzero(is_eval)), probes.select(np.flatnonzero(~is_eval))
    probe_seconds = time.perf_counter() - began

    model = SequenceModel(clicks.n_items, config.sequence)
    model.fit(clicks, ranker_start - int(config.fit_days * DAY_MS), ranker_start)
    train_emb = _walk(model, clicks, train, config.refresh.intervals(clicks.ts, ranker_start, start))
    frozen_emb = model.score(held)
    snapshot = model.snapshot() if save_to is not None else None
    refreshes = config.refresh.intervals(clicks.ts, start, end)
    refreshed_emb = _walk(model, clicks, held, refreshes)

    full = GloboRanker(ALL_FEATURES, config.ranker).fit(train, train_emb)
    no_emb = GloboRanker(NO_EMBEDDING, config.ranker).fit(train, None)
    tree_seconds = full.seconds + no_emb.seconds
    scores = baseline_scores(held, protocol.seed)
    scores["embedding alone, frozen"] = frozen_emb
    scores["embedding alone, refreshed"] = refreshed_emb
    scores["ranker without embedding"] = no_emb.score(held, None)
    scores["full model, frozen"] = full.score(held, frozen_emb)
    if config.refresh_ranker:
        first = {"full": full, "no_emb": no_emb}
        refreshed, seconds = _refreshed_trees(config, first, train, train_emb, held, refreshed_emb, start, end)
        scores["ranker without embedding, refreshed"] = refreshed["no_emb"]
        scores["full model, refreshed"] = refreshed["full"]
        tree_seconds += seconds
    else:
        scores["full model, refreshed"] = full.score(held, refreshed_emb)

    sessions = clicks.session[held.events]
    per_event, rows, best = _rows(scores, held, sessions)
    against = [*BASELINES, "ranker without embedding"]
    pairs = {f"full model, refreshed - {b}": ("full model, refreshed", b) for b in against}
    pairs["full model, frozen - " + best] = ("full model, frozen", best)
    pairs["embedding alone, refreshed - popularity, last hour"] = (
        "embedding alone, refreshed",
        "popularity, last hour",
    )
    pairs["full model, refreshed - full model, frozen"] = ("full model, refreshed", "full model, frozen")
    diffs = {label: paired(per_event[a], per_event[b], sessions) for label, (a, b) in pairs.items()}
    info = _sizes(clicks, held, start, end) | {
        "ranker_events": len(train.events),
        "ranker_rows": full.rows,
        "best_baseline": best,
        "sequence_pairs": model.pairs_trained,
        "refreshes": len(refreshes),
        "training_seconds": model.seconds + tree_seconds,
        "sequence_seconds": model.seconds,
        "tree_seconds": tree_seconds,
        "probe_seconds": probe_seconds,
        "total_seconds": time.perf_counter() - began,
    }
    if snapshot is not None:
        metrics = {name: {m: v[0] for m, v in row.items()} for name, row in rows.items()}
        info["version"] = save_version(
            save_to,
            snapshot=snapshot,
            config=model.config,
            full=full,
            no_embedding=no_emb,
            articles=clicks.articles,
            info={"window": [start, end], "metrics": metrics},
        )
    return GloboReport(rows, diffs, per_event, info)


def evaluate_saved(clicks: Clicks, root: Path, version: str, protocol: Protocol | None = None) -> GloboReport:
    """A saved version on `clicks`' evaluated days without training: the sequence model and the trees as
    saved; the live features (popularity, co-occurrence) come from `clicks` itself, as online."""
    protocol = protocol or Protocol()
    began = time.perf_counter()
    model, full, no_emb, articles, _ = load_version(root, version)
    start, end = protocol.eval_window(clicks)
    held = build_probes(clicks, sample_events(eligible(clicks, start, end), protocol.sample, protocol.seed), protocol)
    at = np.clip(np.searchsorted(articles, clicks.articles), 0, len(articles) - 1)
    index_map = np.where(articles[at] == clicks.articles, at, -1)
    emb = model.score(held, index_map)
    scores = baseline_scores(held, protocol.seed)
    scores[f"embedding alone ({version})"] = emb
    scores[f"ranker without embedding ({version})"] = no_emb.score(held, None)
    scores[f"full model ({version})"] = full.score(held, emb)
    sessions = clicks.session[held.events]
    per_event, rows, best = _rows(scores, held, sessions)
    pairs = {f"full model ({version}) - {b}": (f"full model ({version})", b)
             for b in ["popularity, last hour", best]}  # fmt: skip
    diffs = {label: paired(per_event[a], per_event[b], sessions) for label, (a, b) in pairs.items()}
    info = _sizes(clicks, held, start, end) | {"best_baseline": best, "version": version,
                                               "known_articles": float((index_map >= 0).mean()),
                                               "total_seconds": time.perf_counter() - began}  # fmt: skip
    return GloboReport(rows, diffs, per_event, info)


def first_clicks(clicks: Clicks) -> np.ndarray:
    """(n_items,) unix ms of each article's first click in the log."""
    out = np.full(clicks.n_items, np.iinfo(np.int64).max)
    np.minimum.at(out, clicks.item, clicks.ts)
    return out


def _rows(scores: dict[str, np.ndarray], held: Probes, sessions: np.ndarray) -> tuple[dict, dict, str]:
    """(per-event metrics, summaries, the best co-occurrence baseline by HR@10) of every scorer."""
    per_event = {name: event_metrics(np.where(held.mask, s, -np.inf), held.mask) for name, s in scores.items()}
    rows = {name: summarise(m, sessions) for name, m in per_event.items()}
    best = max(("co-occurrence (session kNN)", "co-occurrence, last click"), key=lambda n: rows[n]["hr@10"][0])
    return per_event, rows, best


def _sizes(clicks: Clicks, held: Probes, start: int, end: int) -> dict[str, Any]:
    return {
        "events": len(held.events),
        "eligible": len(eligible(clicks, start, end)),
        "sessions": int(np.unique(clicks.session[held.events]).size),
        "in_pool": float(held.in_pool.mean()),
        "new_articles": float((first_clicks(clicks)[clicks.item[held.events]] >= start).mean()),
        "window": (start, end),
    }


def _walk(model: SequenceModel, clicks: Clicks, probes: Probes, intervals: list[tuple[int, int]]) -> np.ndarray:
    """Test-then-train: score each interval's probes, then train on its clicks."""
    out = np.zeros(probes.candidates.shape)
    for lo, hi in intervals:
        rows = np.flatnonzero((probes.ts >= lo) & (probes.ts < hi))
        if len(rows):
            out[rows] = model.score(probes.select(rows))
        model.refresh(clicks, lo, hi)
    return out


def _refreshed_trees(
    config: GloboConfig,
    first: dict[str, GloboRanker],
    train: Probes,
    train_emb: np.ndarray,
    held: Probes,
    held_emb: np.ndarray,
    start: int,
    end: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Scores of trees retrained at each evaluated day's start on the last `ranker_days` of revealed events
    (the ranker's training events and the evaluated events scored so far), with the refreshed embedding;
    on the first day these are the `first` trees (the same training events)."""
    pool = _concat(train, held)
    pool_emb = np.concatenate([train_emb, held_emb])
    out = {"full": np.zeros(held.candidates.shape), "no_emb": np.zeros(held.candidates.shape)}
    seconds = 0.0
    for day in range(start, end, DAY_MS):
        past = np.flatnonzero((pool.ts >= day - config.ranker_days * DAY_MS) & (pool.ts < day))
        today = np.flatnonzero((held.ts >= day) & (held.ts < day + DAY_MS))
        if day == start:
            full, no_emb = first["full"], first["no_emb"]
        else:
            full = GloboRanker(ALL_FEATURES, config.ranker).fit(pool.select(past), pool_emb[past])
            no_emb = GloboRanker(NO_EMBEDDING, config.ranker).fit(pool.select(past), None)
            seconds += full.seconds + no_emb.seconds
        out["full"][today] = full.score(held.select(today), held_emb[today])
        out["no_emb"][today] = no_emb.score(held.select(today), None)
    return out, seconds


def _concat(a: Probes, b: Probes) -> Probes:
    return Probes(np.concatenate([a.events, b.events]), np.concatenate([a.candidates, b.candidates]),
                  {k: np.concatenate([a.features[k], b.features[k]]) for k in a.features},
                  np.concatenate([a.history, b.history]), np.concatenate([a.in_pool, b.in_pool]),
                  np.concatenate([a.ts, b.ts]))  # fmt: skip
