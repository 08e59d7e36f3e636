"""Time-ordered evaluation: train on the earlier days, score the last day's impressions prequentially.

Every row's features are those the stream had built before its impression (models.mind), so scoring
the holdout day row by row is the same as scoring each request live and then revealing its clicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.bundle import ModelBundle
from models.metrics import ece, group_metrics, logloss, paired_group_auc, reliability_table
from models.ranker import FEATURES, frame_features
from models.train import TrainConfig, normalise_frame, sort_requests, train

COLUMNS = ["group_auc", "mrr", "ndcg@5", "ndcg@10", "logloss", "ece"]


def holdout_split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(earlier days, last day) by UTC calendar day of the request time."""
    day = _days(frame)
    last = day == day.max()
    return frame[~last].reset_index(drop=True), frame[last].reset_index(drop=True)


def score_frame(bundle: ModelBundle, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(embedding scores, calibrated click probabilities) of every row, through the serving bundle."""
    frame = sort_requests(frame)
    first = ~frame["request_id"].duplicated().to_numpy()
    request_index = np.cumsum(first) - 1
    users = bundle.user_vectors(frame[first].to_dict("records"))  # (n_requests, dim)
    ads = bundle.embed_ads(frame)  # (n_rows, dim)
    emb = (users[request_index] * ads).sum(axis=1)
    probs = bundle.calibrator(bundle.predict_margin(frame_features(frame, emb, bundle.feature_names)))
    return emb, probs


def metrics_row(frame: pd.DataFrame, scores: np.ndarray, probs: np.ndarray | None) -> dict[str, float]:
    """The table's columns for one scorer; logloss and ECE only where it gives probabilities."""
    row = group_metrics(frame["request_id"].to_numpy(), frame["label"].to_numpy(), scores)
    labels = frame["label"].to_numpy()
    row["logloss"] = logloss(labels, probs) if probs is not None else float("nan")
    row["ece"] = ece(labels, probs) if probs is not None else float("nan")
    return row


# Group AUC over fewer requests with both a click and a non-click than this is mostly noise.
MIN_GROUPS = 100


def summary(metrics: dict[str, Any]) -> str:
    """One line for people: the holdout's group AUC and logloss, and a warning when it is too small to mean much."""
    groups = int(metrics.get("impressions", 0))
    text = (
        f"group AUC {float(metrics['group_auc']):.3f}, logloss {float(metrics['logloss']):.3f} on {groups:,} requests"
    )
    if groups < MIN_GROUPS:
        text += f" (too few to mean much: under {MIN_GROUPS} requests with both a click and a non-click)"
    return text


def evaluate_bundle(bundle: ModelBundle, frame: pd.DataFrame) -> dict[str, Any]:
    """One version on a frame: its metrics row and a reliability table (equal-count bins)."""
    frame = sort_requests(frame)
    _, probs = score_frame(bundle, frame)
    return {"metrics": metrics_row(frame, probs, probs),
            "reliability": reliability_table(frame["label"].to_numpy(), probs, 10, "quantile")}  # fmt: skip


def evaluation_table(
    frame: pd.DataFrame, config: TrainConfig | None = None, *, ablation: bool = True, days: int = 1
) -> dict[str, Any]:
    """Score each of the last `days` days with models trained on all days before it; metrics pooled.

    Rows: the full model, the ranker without the embedding score (if `ablation`), the embedding score
    alone, live popularity and random; `paired`: the full model's group AUC minus live popularity's on the
    same impressions, with its standard error. Also returns the bundle and training report of the last day's
    model (trained on every day but the last), its reliability table, and the holdout's size and window.
    """
    config = config or TrainConfig()
    frame = normalise_frame(frame)
    calendar = _days(frame)
    scored = []
    for day in np.unique(calendar)[-days:]:
        history, holdout = frame[calendar < day], sort_requests(frame[calendar == day])
        full, report = train(history, config, version="full")
        emb, probs = score_frame(full, holdout)
        holdout = holdout.assign(_emb=emb, _full=probs)
        if ablation:
            features = [f for f in FEATURES if f != "embedding_score"]
            no_emb, _ = train(history, config, features=features, version="no-emb")
            holdout["_no_emb"] = score_frame(no_emb, holdout)[1]
        scored.append(holdout)
    holdout = pd.concat(scored, ignore_index=True)
    probs = holdout["_full"].to_numpy()
    rows = {"full model": metrics_row(holdout, probs, probs)}
    if ablation:
        rows["ranker without embedding"] = metrics_row(holdout, holdout["_no_emb"], holdout["_no_emb"])
    popularity = holdout["ad_ctr_7d"].to_numpy(dtype=float)  # live smoothed click rate, as the stream counts it
    rows["embedding score alone"] = metrics_row(holdout, holdout["_emb"].to_numpy(), None)
    rows["live popularity"] = metrics_row(holdout, popularity, popularity)
    rows["random"] = metrics_row(holdout, np.random.default_rng(config.seed).random(len(holdout)), None)
    labels = holdout["label"].to_numpy()
    paired = {"full model - live popularity": paired_group_auc(holdout["request_id"].to_numpy(), labels, probs,
                                                                popularity)}  # fmt: skip
    return {"rows": rows, "paired": paired, "bundle": full, "report": report,
            "reliability": reliability_table(labels, probs, 10, "quantile"),
            "holdout": {"days": days, "requests": int(holdout["request_id"].nunique()), "rows": len(holdout),
                        "from_ms": int(holdout["ts"].min()), "to_ms": int(holdout["ts"].max())}}  # fmt: skip


def format_table(rows: dict[str, dict[str, float]], columns: Sequence[str] = COLUMNS) -> str:
    """Markdown table of the metric rows (n/a where a scorer gives no probabilities)."""
    lines = ["| scorer | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, row in rows.items():
        cells = ["n/a" if np.isnan(row[c]) else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _days(frame: pd.DataFrame) -> np.ndarray:
    """UTC calendar day (days since the epoch) of each row's request time."""
    return normalise_frame(frame)["ts"].to_numpy() // 86_400_000


def load_mind(path: str | Path, limit: int | None = None) -> pd.DataFrame:
    from models.mind import impression_frame

    return impression_frame(path, limit)
