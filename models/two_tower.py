"""Two-tower embedding model: a user tower and an ad tower whose cosine similarity scores a (user, ad) pair.

Every id goes through a stable hash into a fixed number of buckets (embedding bags for the user's
recent items and categories), so an id never seen in training still gets a vector: an unseen ad's id
bucket holds a small random vector (or a collision's), and its category / campaign / advertiser
embeddings, which training did fit, carry it. Missing attributes map to bucket 0 ("unknown").

The same code runs on CUDA when `torch.cuda.is_available()` and on the CPU otherwise.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.values import as_list, as_number

# Activity features of the user tower: names from features.aggregates.user_features, log1p-scaled.
USER_ACTIVITY = ["page_view_24h", "page_view_7d", "ad_impression_24h", "ad_click_24h", "ad_click_7d",
                 "impressions_total", "clicks_total"]  # fmt: skip
AD_ATTRIBUTES = ["ad_id", "category", "campaign_id", "advertiser_id"]


@dataclass
class TwoTowerConfig:
    dim: int = 32  # output embedding size (both towers, L2-normalised)
    hidden: int = 64  # width of each tower's hidden layer
    item_buckets: int = 1 << 17  # hash buckets of item / ad ids (shared size, separate tables per tower)
    category_buckets: int = 1 << 10  # hash buckets of categories
    attribute_buckets: int = 1 << 14  # hash buckets of campaign and advertiser ids
    n_activity: int = len(USER_ACTIVITY)  # scalar activity inputs of the user tower
    temperature: float = 0.1  # softmax temperature on cosine similarities
    negatives: int = 4  # non-clicked candidates of the same impression per click (sampled softmax)
    epochs: int = 4  # passes over the training clicks
    batch_size: int = 256  # clicks per step
    lr: float = 3e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    seed: int = 0  # seeds torch and numpy: same data + seed -> same weights


class TwoTower(nn.Module):
    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.user_items = nn.EmbeddingBag(c.item_buckets, c.dim, mode="mean")
        self.user_categories = nn.EmbeddingBag(c.category_buckets, c.dim, mode="mean")
        self.user_activity = nn.Linear(c.n_activity, c.dim)
        self.user_mlp = nn.Sequential(nn.Linear(3 * c.dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.dim))
        self.ad_id = nn.Embedding(c.item_buckets, c.dim)
        self.ad_category = nn.Embedding(c.category_buckets, c.dim)
        self.ad_campaign = nn.Embedding(c.attribute_buckets, c.dim)
        self.ad_advertiser = nn.Embedding(c.attribute_buckets, c.dim)
        self.ad_mlp = nn.Sequential(nn.Linear(c.dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.dim))
        for table in (self.user_items, self.user_categories, self.ad_id, self.ad_category, self.ad_campaign,
                      self.ad_advertiser):  # fmt: skip
            nn.init.normal_(table.weight, std=0.05)

    def user_tower(self, users: dict[str, torch.Tensor]) -> torch.Tensor:
        items = self.user_items(users["items"], users["item_offsets"])  # (B, dim)
        cats = self.user_categories(users["categories"], users["category_offsets"])  # (B, dim)
        activity = self.user_activity(users["activity"])  # (B, dim)
        return F.normalize(self.user_mlp(torch.cat([items, cats, activity], dim=1)), dim=1)

    def ad_tower(self, ads: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.ad_id(ads["ad_id"]) + self.ad_category(ads["category"])  # (N, dim)
        x = x + self.ad_campaign(ads["campaign_id"]) + self.ad_advertiser(ads["advertiser_id"])
        return F.normalize(x + self.ad_mlp(x), dim=1)

    def forward(self, users: dict[str, Tensor], ads: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(user_emb (B, dim), ad_emb (N, dim)), both L2-normalised."""
        return self.user_tower(users), self.ad_tower(ads)


class CpuUserTower:
    """The user tower's forward pass in numpy, on weights shared with a CPU `TwoTower` (no copy).

    Serving embeds one user per request, where torch's per-call dispatch over the tower's ~10 ops costs
    more than the arithmetic; this gives the same float32 result (equal to 1e-6: tests/models) in a few
    numpy calls (timed by `python -m bench.select_path`).
    On CUDA the torch tower is used. Reads the weights as they are: build it after training.
    """

    def __init__(self, tower: TwoTower) -> None:
        def w(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy()

        self.items, self.categories = w(tower.user_items.weight), w(tower.user_categories.weight)  # (buckets, dim)
        self.activity_w, self.activity_b = w(tower.user_activity.weight).T, w(tower.user_activity.bias)
        first, last = tower.user_mlp[0], tower.user_mlp[2]
        self.w1, self.b1 = w(first.weight).T, w(first.bias)  # (3 dim, hidden), (hidden,)
        self.w2, self.b2 = w(last.weight).T, w(last.bias)  # (hidden, dim), (dim,)
        # For `one`: the first MLP layer by input block, the activity layer folded into its block (in float64).
        dim = self.items.shape[1]
        self.w1_items, self.w1_categories, w1_activity = self.w1[:dim], self.w1[dim : 2 * dim], self.w1[2 * dim :]
        fold = self.activity_w.astype(np.float64) @ w1_activity.astype(np.float64)  # (n_activity, hidden)
        self.activity_w1 = fold.astype(np.float32)
        self.activity_b1 = (self.activity_b.astype(np.float64) @ w1_activity + self.b1).astype(np.float32)

    def __call__(self, users: dict[str, np.ndarray]) -> np.ndarray:
        """(B, dim) float32, L2-normalised: `TwoTower.user_tower` of the same `encode_users` batch."""
        items = _bag_means(self.items, users["items"], users["item_offsets"])  # (B, dim)
        cats = _bag_means(self.categories, users["categories"], users["category_offsets"])  # (B, dim)
        activity = users["activity"] @ self.activity_w + self.activity_b  # (B, dim)
        hidden = np.maximum(np.concatenate([items, cats, activity], axis=1) @ self.w1 + self.b1, 0)  # (B, hidden)
        out = hidden @ self.w2 + self.b2  # (B, dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # F.normalize's eps

    def one(self, row: Mapping[str, Any], config: TwoTowerConfig) -> np.ndarray:
        """(dim,) vector of one user_activity row: `self(encode_users([row], config))[0]` in half the numpy
        calls (serving embeds one user per request): bags summed directly, the activity layer folded into
        the first MLP layer (equal to the batch forward to ~1e-7: tests/models)."""
        items = hash_ids(as_list(row.get("recent_items")), config.item_buckets, "item:")
        categories = hash_ids(as_list(row.get("recent_categories")), config.category_buckets, "cat:")
        activity = np.fromiter((as_number(row.get(name)) for name in USER_ACTIVITY), np.float32, len(USER_ACTIVITY))
        hidden = np.log1p(np.maximum(activity, 0)) @ self.activity_w1 + self.activity_b1  # (hidden,)
        if len(items):
            hidden += (np.add.reduce(self.items[items]) / len(items)) @ self.w1_items
        if len(categories):
            hidden += (np.add.reduce(self.categories[categories]) / len(categories)) @ self.w1_categories
        out = np.maximum(hidden, 0) @ self.w2 + self.b2  # (dim,)
        return out / max(float(np.sqrt(out @ out)), 1e-12)


def _bag_means(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """EmbeddingBag(mode="mean"): the mean of each bag's rows, zeros for an empty bag."""
    bounds = np.append(offsets, len(ids))
    out = np.zeros((len(offsets), table.shape[1]), dtype=table.dtype)
    for b in range(len(offsets)):  # one bag per user: a single iteration in serving
        if bounds[b + 1] > bounds[b]:
            rows = table[ids[bounds[b] : bounds[b + 1]]]
            out[b] = np.add.reduce(rows, axis=0) / len(rows)  # = rows.mean(axis=0), without its overhead
    return out


# --- inputs: hashing and batching (numpy, shared by training and serving) -----------------------------


def hash_ids(values: Sequence[Any], buckets: int, salt: str) -> np.ndarray:
    """Stable (process-independent) hash of each value into 1..buckets-1; None/empty -> 0 ("unknown")."""
    prefix = salt.encode()
    return np.fromiter(
        (1 + zlib.crc32(prefix + str(v).encode()) % (buckets - 1) if _present(v) else 0 for v in values),
        dtype=np.int64,
        count=len(values),
    )


def encode_users(rows: Sequence[dict[str, Any]], config: TwoTowerConfig) -> dict[str, np.ndarray]:
    """User-tower inputs of user feature rows (dicts with user_features' names); missing keys are empty/0."""
    items = [as_list(r.get("recent_items")) for r in rows]
    cats = [as_list(r.get("recent_categories")) for r in rows]
    activity = np.array([[as_number(r.get(name)) for name in USER_ACTIVITY] for r in rows], dtype=np.float32)
    return {
        "items": hash_ids([i for row in items for i in row], config.item_buckets, "item:"),
        "item_offsets": _offsets(items),
        "categories": hash_ids([c for row in cats for c in row], config.category_buckets, "cat:"),
        "category_offsets": _offsets(cats),
        "activity": np.log1p(np.maximum(activity.reshape(len(rows), config.n_activity), 0)),
    }


def encode_ads(columns: dict[str, Sequence[Any]], config: TwoTowerConfig) -> dict[str, np.ndarray]:
    """Ad-tower inputs from attribute columns (ad_id required; category, campaign_id, advertiser_id optional)."""
    n = len(columns["ad_id"])
    buckets = {"ad_id": config.item_buckets, "category": config.category_buckets,
               "campaign_id": config.attribute_buckets, "advertiser_id": config.attribute_buckets}  # fmt: skip
    out = {}
    for name, size in buckets.items():
        values = columns.get(name)
        out[name] = hash_ids(list(values), size, f"{name}:") if values is not None else np.zeros(n, np.int64)
    return out


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _present(value: Any) -> bool:
    return value is not None and value == value and value != ""  # value == value: False for NaN


def _offsets(bags: list[list[Any]]) -> np.ndarray:
    return np.cumsum([0] + [len(b) for b in bags[:-1]], dtype=np.int64)
