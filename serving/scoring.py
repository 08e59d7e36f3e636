"""What selection needs from the model and the feature store (Protocols), plus the scorers serving owns.

- `ModelBundle` / `ModelRegistry`: satisfied by `models.bundle.ModelBundle` and `models.registry.Registry`.
- `FeatureReader`: satisfied by `features.online.OnlineFeatureReader`.
- `ProjectionBundle`: a small, real bundle-shaped scorer (random-projection towers + a logistic
  formula) for tests and the benchmark, so they do not wait for a trained model.
- The fallback ranking (no promoted model, or a model error) lives in `selection.py`: live ad CTR
  from the ad-feature cache x bid, which needs no user features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Every `ad_performance` feature (features/repo), cached per ad by serving and passed to the ranker.
AD_STAT_COLUMNS = (
    *(f"ad_{count}_{window}" for window in ("1h", "24h", "7d") for count in ("impressions", "clicks")),
    "ad_ctr_24h",
    "ad_ctr_7d",
    "ad_last_seen_ms",
)
# Columns of `ad_frame` handed to `predict_ctr`: one numpy array per column, one row per candidate.
AD_FRAME_COLUMNS = ("ad_id", "campaign_id", "advertiser_id", "category", "bid", *AD_STAT_COLUMNS)


@runtime_checkable
class FeatureReader(Protocol):
    """Online features (Feast's Redis layout): one round trip per call; unknown ids give `{}`."""

    def user(self, user_id: str) -> dict[str, Any]: ...

    def ads(self, ad_ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...


@runtime_checkable
class ModelBundle(Protocol):
    """A loaded model version: the two-tower embeddings and the calibrated ranker."""

    version: str
    ad_ids: list[str]  # rows of ad_matrix
    ad_matrix: np.ndarray  # (n_ads, d) float32, rows L2-normalised

    def user_vector(self, user_features: dict[str, Any]) -> np.ndarray:  # (d,) float32
        ...

    def embed_ads(self, ad_columns: Mapping[str, Sequence[Any]]) -> np.ndarray:  # (n, d) float32
        """Ads as columns (ad_id, category, campaign_id, advertiser_id, ...), one value per ad: the form
        models.bundle.ModelBundle reads."""
        ...

    def predict_ctr(
        self,
        user_features: dict[str, Any],
        ad_frame: Mapping[str, np.ndarray],  # AD_FRAME_COLUMNS -> (k,) arrays
        context: dict[str, Any],
        embedding_scores: np.ndarray,  # (k,) dot products of the user vector with the candidates
    ) -> np.ndarray:  # (k,) float, calibrated click probabilities
        ...


@runtime_checkable
class ModelRegistry(Protocol):
    def promoted(self) -> str | None: ...  # the promoted version, None if none

    def load(self, version: str) -> ModelBundle: ...


class ProjectionBundle:
    """Deterministic stand-in model: an ad vector is a fixed random projection of its category plus a
    little per-ad noise; a user vector is the affinity-weighted mix of their top categories' vectors;
    pCTR = sigmoid(a * embedding score + b * log ad CTR + c). Same shapes and calls as the real bundle."""

    def __init__(self, catalog_rows: Sequence[Mapping[str, Any]], *, dim: int = 32, version: str = "projection-v1"):
        self.version = version
        self.dim = dim
        self._category_vectors: dict[str, np.ndarray] = {}  # built once per category
        self.ad_ids = [str(r["ad_id"]) for r in catalog_rows]
        self.ad_matrix = self.embed_ads(catalog_rows)

    def category_vector(self, category: str) -> np.ndarray:
        cached = self._category_vectors.get(category)
        if cached is not None:
            return cached
        seed = int.from_bytes(hashlib.blake2b(category.encode(), digest_size=4).digest(), "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        self._category_vectors[category] = v = v / np.linalg.norm(v)
        return v

    def embed_ads(self, ad_rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> np.ndarray:
        if isinstance(ad_rows, Mapping):  # columns (the protocol's form) -> rows
            ad_rows = [dict(zip(ad_rows, values, strict=True)) for values in zip(*ad_rows.values(), strict=True)]
        out = np.empty((len(ad_rows), self.dim), dtype=np.float32)  # (n, d)
        for i, row in enumerate(ad_rows):
            seed = int.from_bytes(hashlib.blake2b(str(row["ad_id"]).encode(), digest_size=4).digest(), "little")
            noise = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = self.category_vector(str(row["category"])) + 0.3 * noise / np.sqrt(self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def user_vector(self, user_features: dict[str, Any]) -> np.ndarray:
        cats = list(user_features.get("top_categories") or [])[:5]
        scores = list(user_features.get("top_category_scores") or [1.0] * len(cats))[: len(cats)]
        if not cats:
            return np.zeros(self.dim, dtype=np.float32)
        v = sum(float(s) * self.category_vector(c) for c, s in zip(cats, scores, strict=False))
        norm = float(np.linalg.norm(v))
        return (v / norm).astype(np.float32) if norm else np.zeros(self.dim, dtype=np.float32)

    def predict_ctr(self, user_features, ad_frame, context, embedding_scores) -> np.ndarray:
        ctr = np.asarray(ad_frame["ad_ctr_24h"], dtype=np.float64)
        z = 2.5 * embedding_scores + 0.5 * np.log(np.clip(ctr, 1e-4, 1.0)) - 4.5
        return 1.0 / (1.0 + np.exp(-z))


class StaticRegistry:
    """A registry over bundles already in memory (tests, the benchmark); `promote` swaps the version."""

    def __init__(self, bundles: Mapping[str, ModelBundle] | None = None, promoted: str | None = None):
        self.bundles = dict(bundles or {})
        self._promoted = promoted

    def promote(self, version: str | None) -> None:
        self._promoted = version

    def promoted(self) -> str | None:
        return self._promoted

    def load(self, version: str) -> ModelBundle:
        return self.bundles[version]


class EmptyRegistry:
    """No model promoted: serving ranks with the fallback scorer (flagged `no_model`)."""

    def promoted(self) -> str | None:
        return None

    def load(self, version: str) -> ModelBundle:
        raise KeyError(version)
