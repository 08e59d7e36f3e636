"""Training from a frame of impression rows (from Feast's point-in-time join or an in-process replay).

The frame holds one row per (request, candidate ad): request_id, user_id, ad_id, ts (epoch ms),
label (1 = clicked), context columns (position, slate_size, hour, device), ad attributes (category,
campaign_id, advertiser_id) and the feature columns named as `features.aggregates.user_features` and
`ad_features` name them. Requests are split in time order, earliest first:

    | two-tower | ranker trees | early stopping | calibration |

so the ranker learns from embedding scores of requests the two-tower never saw (its scores on its own
training clicks would be over-confident), and the calibrator from margins of requests the trees never saw.
With `trees_learn_tower_rows` (the default) the trees also learn from the two-tower's requests, with
their embedding score missing (NaN: LightGBM sends them down each split's learned missing-value side),
so every other feature is learned from all requests before early stopping and not only from the
trees' own slice; splits on the embedding score still come from out-of-sample scores only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from models.bundle import ModelBundle
from models.ranker import FEATURES, OFFSET_FEATURE, PlattCalibrator, frame_features, train_ranker
from models.two_tower import AD_ATTRIBUTES, TwoTower, TwoTowerConfig, default_device, encode_ads, encode_users

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    seed: int = 0  # seeds the two-tower, its negative sampling and LightGBM
    tower_share: float = 0.45  # earliest share of requests: two-tower training
    valid_share: float = 0.15  # share before the calibration slice: LightGBM early stopping
    calibration_share: float = 0.15  # latest share: Platt calibration
    trees_learn_tower_rows: bool = True  # the trees learn from the two-tower's requests too (embedding NaN)
    num_boost_round: int = 600  # upper bound; early stopping picks the number of trees
    tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)


def train(frame: pd.DataFrame, config: TrainConfig | None = None, *, features: list[str] | None = None,
          version: str = "dev") -> tuple[ModelBundle, dict[str, Any]]:  # fmt: skip
    """Train the two-tower, the ranker and its calibrator; returns the bundle and a training report."""
    config = config or TrainConfig()
    features = list(features or FEATURES)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    device = default_device()
    frame = sort_requests(frame)
    part = split_requests(frame, config)
    tower = train_two_tower(frame[part == 0], config.tower, device)
    keep = np.ones(len(frame), dtype=bool) if config.trees_learn_tower_rows else part > 0
    ranker_rows, rpart = frame[keep], part[keep]
    emb = embedding_scores(tower, ranker_rows, device)
    emb[rpart == 0] = np.nan  # the tower's own requests: its scores there are in-sample, never learned from
    x = frame_features(ranker_rows, emb, features)
    y = ranker_rows["label"].to_numpy()
    rpart = np.where(rpart == 0, 1, rpart)  # the tower's requests kept: they learn with the trees' slice
    booster = train_ranker(x[rpart == 1], y[rpart == 1], x[rpart == 2], y[rpart == 2], features=features,
                           seed=config.seed, num_boost_round=config.num_boost_round)  # fmt: skip
    catalog = ad_catalog(frame)
    bundle = ModelBundle(version=version, tower=tower, booster=booster, calibrator=PlattCalibrator(),
                         feature_names=features, ad_ids=catalog["ad_id"].tolist(), ad_matrix=np.zeros((0, 0)),
                         offset_feature=OFFSET_FEATURE if OFFSET_FEATURE in features else None,
                         device=device)  # fmt: skip
    bundle.calibrator = PlattCalibrator.fit(bundle.predict_margin(x[rpart == 3]), y[rpart == 3])
    bundle.ad_matrix = bundle.embed_ads(catalog)
    report = {
        "seed": config.seed,
        "config": asdict(config),
        "data_window": {"from_ms": int(frame["ts"].min()), "to_ms": int(frame["ts"].max())},
        "rows": {name: int((part == i).sum()) for i, name in enumerate(("tower", "trees", "valid", "calibration"))},
        "tree_learning_rows": int((rpart == 1).sum()),  # the trees' slice, plus the tower's if trees_learn_tower_rows
        "best_iteration": booster.best_iteration,
        "training_seconds": round(time.monotonic() - started, 2),
        "device": str(device),
    }
    log.info("trained %s in %.1f s (%d trees)", version, report["training_seconds"], booster.num_trees())
    return bundle, report


def normalise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`ts` as epoch milliseconds; a Feast frame's `event_timestamp` (datetime, UTC if naive) stands in for it."""
    if "ts" not in frame and "event_timestamp" in frame:
        frame = frame.rename(columns={"event_timestamp": "ts"})
    if pd.api.types.is_datetime64_any_dtype(frame["ts"]):
        ts = frame["ts"].dt.tz_localize("UTC") if frame["ts"].dt.tz is None else frame["ts"]
        frame = frame.assign(ts=(ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1))
    return frame


def sort_requests(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by request time (see normalise_frame), each request's rows contiguous, in their original order."""
    frame = normalise_frame(frame)
    order = np.lexsort((np.arange(len(frame)), frame["request_id"].astype(str).to_numpy(), frame["ts"].to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def split_requests(frame: pd.DataFrame, config: TrainConfig) -> np.ndarray:
    """Per row 0..3 (two-tower, trees, valid, calibration) by its request's rank in time."""
    requests = frame.groupby("request_id", sort=False)["ts"].min().sort_values(kind="stable")  # request -> time
    rank = pd.Series(np.arange(len(requests)) / max(len(requests), 1), index=requests.index)
    share = rank.reindex(frame["request_id"].to_numpy()).to_numpy()
    bounds = np.cumsum([config.tower_share, 1 - config.tower_share - config.valid_share - config.calibration_share,
                        config.valid_share])  # fmt: skip
    return np.searchsorted(bounds, share, side="right")


def ad_catalog(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per ad id with its latest attributes."""
    columns = [c for c in AD_ATTRIBUTES if c in frame]
    return frame[columns].drop_duplicates("ad_id", keep="last").reset_index(drop=True)


def train_two_tower(frame: pd.DataFrame, config: TwoTowerConfig, device: torch.device) -> TwoTower:
    """Sampled softmax over each click and `negatives` non-clicked candidates of its own impression."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = TwoTower(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    users, request_index = _request_users(frame, config)
    ads = encode_ads({c: frame[c].tolist() for c in AD_ATTRIBUTES if c in frame}, config)
    labels = frame["label"].to_numpy()
    clicks = np.flatnonzero(labels == 1)
    negatives = _negatives_by_request(request_index, labels)
    model.train()
    for _ in range(config.epochs):
        order = rng.permutation(clicks)
        for lo in range(0, len(order), config.batch_size):
            pos = order[lo : lo + config.batch_size]  # (B,) row numbers of clicks
            neg = np.stack([_sample(negatives, request_index[p], config.negatives, rng, len(frame)) for p in pos])
            rows = np.concatenate([pos[:, None], neg], axis=1)  # (B, 1 + K)
            user_emb, ad_emb = model(_user_batch(users, request_index[pos], device), _take(ads, rows.ravel(), device))
            logits = torch.einsum("bd,bkd->bk", user_emb, ad_emb.view(len(pos), rows.shape[1], -1))
            loss = F.cross_entropy(logits / config.temperature, torch.zeros(len(pos), dtype=torch.long, device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def embedding_scores(model: TwoTower, frame: pd.DataFrame, device: torch.device, batch: int = 4096) -> np.ndarray:
    """(n_rows,) cosine of each row's user vector (from its request) and ad vector."""
    users, request_index = _request_users(frame, model.config)
    ads = encode_ads({c: frame[c].tolist() for c in AD_ATTRIBUTES if c in frame}, model.config)
    out = np.empty(len(frame), dtype=np.float32)
    with torch.inference_mode():
        user_emb = model.user_tower(_user_batch(users, np.arange(len(users["first_row"])), device))
        for lo in range(0, len(frame), batch):
            rows = np.arange(lo, min(lo + batch, len(frame)))
            ad_emb = model.ad_tower(_take(ads, rows, device))
            out[rows] = (user_emb[torch.from_numpy(request_index[rows]).to(device)] * ad_emb).sum(1).cpu().numpy()
    return out


# --- helpers ------------------------------------------------------------------------------------------


def _request_users(frame: pd.DataFrame, config: TwoTowerConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Encoded user inputs per request (first row of each) and each row's request number."""
    codes, uniques = pd.factorize(frame["request_id"], sort=False)
    first_row = np.zeros(len(uniques), dtype=np.int64)
    first_row[codes[::-1]] = np.arange(len(frame))[::-1]
    rows = frame.iloc[first_row].to_dict("records")
    encoded = encode_users(rows, config)
    encoded["first_row"] = first_row
    encoded["item_lengths"] = np.diff(np.r_[encoded["item_offsets"], len(encoded["items"])])
    encoded["category_lengths"] = np.diff(np.r_[encoded["category_offsets"], len(encoded["categories"])])
    return encoded, codes.astype(np.int64)


def _user_batch(users: dict[str, np.ndarray], requests: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    out = {"activity": torch.from_numpy(users["activity"][requests]).to(device)}
    for bag, key in (("items", "item"), ("categories", "category")):
        starts, lengths = users[f"{key}_offsets"][requests], users[f"{key}_lengths"][requests]
        flat = np.concatenate([users[bag][s : s + n] for s, n in zip(starts, lengths, strict=True)] or [[]])
        out[bag] = torch.from_numpy(flat.astype(np.int64)).to(device)
        out[f"{key}_offsets"] = torch.from_numpy(np.cumsum(np.r_[0, lengths[:-1]]).astype(np.int64)).to(device)
    return out


def _take(ads: dict[str, np.ndarray], rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[rows]).to(device) for k, v in ads.items()}


def _negatives_by_request(request_index: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    rows = np.flatnonzero(labels == 0)
    order = np.argsort(request_index[rows], kind="stable")
    rows = rows[order]
    keys, starts = np.unique(request_index[rows], return_index=True)
    return dict(zip(keys.tolist(), np.split(rows, starts[1:]), strict=True))


def _sample(negatives: dict[int, np.ndarray], request: int, k: int, rng: np.random.Generator, n_rows: int):
    pool = negatives.get(int(request))
    if pool is None or len(pool) == 0:  # an impression with only clicks: any other rows
        return rng.integers(0, n_rows, size=k)
    return rng.choice(pool, size=k, replace=len(pool) < k)
