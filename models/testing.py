"""Stand-ins for tests and benchmarks: a deterministic bundle-shaped model and in-memory registries.

`ProjectionBundle` is a small, real scorer (random-projection towers plus a logistic formula) with the
calls of `models.bundle.ModelBundle`, so tests and benchmarks need not wait for a trained model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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

    def user_vectors(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return np.stack([self.user_vector(dict(r)) for r in rows]) if rows else np.zeros((0, self.dim), np.float32)

    def predict_ctr_many(self, users, ad_frames, contexts, embedding_scores) -> list[np.ndarray]:
        return [self.predict_ctr(*args) for args in zip(users, ad_frames, contexts, embedding_scores, strict=True)]

    def predict_ctr(self, user_features, ad_frame, context, embedding_scores) -> np.ndarray:
        ctr = np.asarray(ad_frame["ad_ctr_24h"], dtype=np.float64)
        z = 2.5 * embedding_scores + 0.5 * np.log(np.clip(ctr, 1e-4, 1.0)) - 4.5
        return 1.0 / (1.0 + np.exp(-z))


class StaticRegistry:
    """A registry over bundles already in memory (tests, the benchmark); `promote` swaps the version."""

    def __init__(self, bundles: Mapping[str, Any] | None = None, promoted: str | None = None):
        self.bundles = dict(bundles or {})
        self._promoted = promoted

    def promote(self, version: str | None) -> None:
        self._promoted = version

    def promoted(self) -> str | None:
        return self._promoted

    def load(self, version: str) -> Any:
        return self.bundles[version]


class EmptyRegistry:
    """No model promoted: serving ranks with the fallback scorer (flagged `no_model`)."""

    def promoted(self) -> str | None:
        return None

    def load(self, version: str) -> Any:
        raise KeyError(version)
