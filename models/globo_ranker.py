"""LightGBM ranker of the Globo protocol: per candidate, the live popularity, recency and co-occurrence
features of `models.probes` plus the sequence model's score -> a ranking score (lambdarank per event).

The protocol draws negatives from the articles clicked in the last hour, so only the clicked article
can lie outside that pool (no click in the hour, or none ever). A learner shown such positives learns
"outside the pool -> the answer", which says nothing about readers. So the trees learn only from
events whose clicked article is in the pool, and `since_last_min` is capped at the pool's window: an
article outside the pool looks to the trees like the least popular article inside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from models.probes import FEATURES, Probes

EMBEDDING = "embedding"
SLATE = ["pop_1h_vs_slate", "cooc_vote_vs_slate", "embedding_rank"]  # relative to the event's candidates
ALL_FEATURES = [*FEATURES, EMBEDDING, *SLATE]
PARAMS = {  # flat, as LightGBM's python-guide keeps them
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    "learning_rate": 0.1,
    "num_leaves": 31,
    "min_data_in_leaf": 200,
    "feature_fraction": 0.9,
    "lambda_l2": 1.0,
    "num_threads": 2,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
    "seed": 0,
}


@dataclass
class RankerConfig:
    rounds: int = 200  # boosting rounds at most (early stopping on the last `valid_share` of events)
    valid_share: float = 0.1  # latest share of the training events held out for early stopping
    early_stopping: int = 30  # rounds without improvement before stopping
    train_negatives: int = 20  # negatives kept per training event (seeded): more events for the same rows
    seed: int = 0


def feature_tensor(probes: Probes, embedding: np.ndarray | None, names: Sequence[str]) -> np.ndarray:
    """(E, C, F) features of every candidate, in `names` order."""
    cols = dict(probes.features)
    cols["since_last_min"] = np.minimum(np.nan_to_num(cols["since_last_min"], nan=np.inf), 60.0)
    emb = np.zeros(probes.candidates.shape) if embedding is None else embedding
    mask = probes.mask
    cols[EMBEDDING] = emb
    cols["pop_1h_vs_slate"] = cols["pop_1h"] / np.maximum(
        np.where(mask, cols["pop_1h"], 0).max(axis=1, keepdims=True), 1
    )
    top = np.where(mask, cols["cooc_vote"], 0).max(axis=1, keepdims=True)
    cols["cooc_vote_vs_slate"] = cols["cooc_vote"] / np.maximum(top, 1e-9)
    masked = np.where(mask, emb, -np.inf)
    cols["embedding_rank"] = (masked[:, :, None] < masked[:, None, :]).sum(axis=2).astype(float)  # 0 = best
    return np.stack([cols[n] for n in names], axis=2)


class GloboRanker:
    def __init__(self, features: Sequence[str], config: RankerConfig | None = None) -> None:
        self.features = list(features)
        self.config = config or RankerConfig()
        self.booster: lgb.Booster | None = None
        self.seconds = 0.0
        self.rows = 0

    def fit(self, probes: Probes, embedding: np.ndarray | None) -> GloboRanker:
        began = time.perf_counter()
        keep = np.flatnonzero(probes.in_pool)  # see the module docstring
        probes = probes.select(keep)
        embedding = None if embedding is None else embedding[keep]
        x = feature_tensor(probes, embedding, self.features)  # (E, C, F)
        mask = _keep_negatives(probes.mask, self.config.train_negatives, self.config.seed)
        labels = np.zeros(mask.shape, dtype=np.int32)
        labels[:, 0] = 1
        # The clicked article is column 0: shuffled within each event, or LightGBM's NDCG, which keeps tied
        # scores in row order, credits a tie to the click and early stopping picks a one-tree model.
        order = np.argsort(np.random.default_rng(self.config.seed).random(mask.shape), axis=1)
        x = np.take_along_axis(x, order[:, :, None], axis=1)
        labels, mask = np.take_along_axis(labels, order, axis=1), np.take_along_axis(mask, order, axis=1)
        split = int(len(keep) * (1 - self.config.valid_share))
        train = _dataset(x[:split], labels[:split], mask[:split])
        valid = _dataset(x[split:], labels[split:], mask[split:], reference=train)
        self.booster = lgb.train(PARAMS, train, num_boost_round=self.config.rounds, valid_sets=[valid],
                                 callbacks=[lgb.early_stopping(self.config.early_stopping, verbose=False)])  # fmt: skip
        self.rows = int(mask.sum())
        self.seconds = time.perf_counter() - began
        return self

    def score(self, probes: Probes, embedding: np.ndarray | None) -> np.ndarray:
        """(E, C) ranking scores (padded candidates -inf)."""
        assert self.booster is not None, "fit first"
        x = feature_tensor(probes, embedding, self.features)
        e, c, f = x.shape
        out = self.booster.predict(x.reshape(e * c, f), num_iteration=self.booster.best_iteration).reshape(e, c)
        return np.where(probes.mask, out, -np.inf)


def _keep_negatives(mask: np.ndarray, k: int, seed: int) -> np.ndarray:
    """`mask` with at most k negatives per event left, drawn uniformly (the positive always kept)."""
    keys = np.random.default_rng(seed).random(mask.shape)
    keys[:, 0] = -1.0  # the positive sorts first
    keys[~mask] = np.inf
    order = np.argsort(keys, axis=1)
    keep = np.zeros_like(mask)
    np.put_along_axis(keep, order[:, : k + 1], True, axis=1)
    return keep & mask


def _dataset(x: np.ndarray, labels: np.ndarray, mask: np.ndarray, reference: lgb.Dataset | None = None) -> lgb.Dataset:
    rows = mask.reshape(-1)
    return lgb.Dataset(x.reshape(-1, x.shape[2])[rows], labels.reshape(-1)[rows], group=mask.sum(axis=1),
                       reference=reference, free_raw_data=True)  # fmt: skip
