"""Ranking and calibration metrics, as MIND reports them (per impression) plus pointwise logloss and ECE.

Per-impression metrics follow the MIND evaluation script: candidates of one impression are sorted by
score; AUC, MRR and nDCG@k are computed per impression and averaged over the impressions that have
both a click and a non-click (an impression without both has no ranking to judge).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks: a tie between a click and a non-click counts 1/2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mrr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean reciprocal rank of the clicked candidates (MIND's `mrr_score`)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(labels, dtype=float)[order]
    return float((hits / np.arange(1, hits.size + 1)).sum() / hits.sum())


def ndcg(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """nDCG@k with gains 2^label - 1 and log2(rank + 1) discounts (MIND's `ndcg_score`)."""
    labels = np.asarray(labels, dtype=float)
    return _dcg(labels, scores, k) / _dcg(labels, labels, k)


def group_metrics(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Mean per-impression AUC, MRR, nDCG@5 and nDCG@10 over impressions with both classes."""
    groups, labels, scores = np.asarray(groups), np.asarray(labels), np.asarray(scores, dtype=float)
    order = np.argsort(groups, kind="stable")
    groups, labels, scores = groups[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    rows = []
    for lo, hi in zip(starts, np.r_[starts[1:], groups.size], strict=True):
        y, s = labels[lo:hi], scores[lo:hi]
        if 0 < y.sum() < y.size:
            rows.append((auc(y, s), mrr(y, s), ndcg(y, s, 5), ndcg(y, s, 10)))
    values = np.array(rows) if rows else np.full((1, 4), np.nan)
    means = values.mean(axis=0)
    return {"group_auc": means[0], "mrr": means[1], "ndcg@5": means[2], "ndcg@10": means[3], "impressions": len(rows)}


def paired_group_auc(groups: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Group AUC of scorer `a` minus scorer `b` on the same impressions, with its standard error.

    The per-impression differences are paired (both scorers judge the same impressions), so their
    standard error is much smaller than either group AUC's own: it says whether a gap is noise.
    """
    groups, labels = np.asarray(groups), np.asarray(labels)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    order = np.argsort(groups, kind="stable")
    groups, labels, a, b = groups[order], labels[order], a[order], b[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    diffs = [auc(labels[lo:hi], a[lo:hi]) - auc(labels[lo:hi], b[lo:hi])
             for lo, hi in zip(starts, np.r_[starts[1:], groups.size], strict=True)
             if 0 < labels[lo:hi].sum() < hi - lo]  # fmt: skip
    d = np.asarray(diffs, dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"difference": float(d.mean()) if d.size else float("nan"), "se": se, "impressions": int(d.size)}


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    y = np.asarray(labels, dtype=float)
    p = np.clip(np.asarray(probs, dtype=float), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def reliability_table(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10, strategy: str = "uniform") -> list[dict]:
    """Per bin: its range, rows, mean predicted probability and observed click rate (empty bins left out).

    `uniform` bins split [0, 1] into equal widths (the standard ECE); `quantile` bins hold equal row
    counts, which says more when most probabilities are small (click rates of a few percent).
    """
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', not {strategy!r}")
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    table = []
    for b in range(len(edges) - 1):
        mask = index == b
        if mask.any():
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "rows": int(mask.sum()),
                          "predicted": float(p[mask].mean()), "observed": float(y[mask].mean())})  # fmt: skip
    return table


def ece(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error: row-weighted mean |observed - predicted| over the reliability bins."""
    table = reliability_table(labels, probs, n_bins, strategy)
    total = sum(row["rows"] for row in table)
    return float(sum(row["rows"] * abs(row["observed"] - row["predicted"]) for row in table) / total)


def _dcg(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    gains = 2 ** labels[order] - 1
    return float((gains / np.log2(np.arange(2, order.size + 2))).sum())
