"""ModelBundle: what serving calls per request (user vector, ad vectors, calibrated click probabilities).

Built once per model version (by the registry's `load` or by training) and shared read-only; every
per-request method is vectorised over candidates and allocates only the request's own arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch

from models.ranker import PlattCalibrator, base_margin, request_features
from models.two_tower import AD_ATTRIBUTES, CpuUserTower, TwoTower, encode_ads, encode_users, to_tensors


@dataclass
class ModelBundle:
    version: str
    tower: TwoTower  # in eval mode, on `device`
    booster: lgb.Booster
    calibrator: PlattCalibrator
    feature_names: list[str]  # columns of the ranker, in order
    ad_ids: list[str]  # row i of ad_matrix is ad_ids[i]
    ad_matrix: np.ndarray  # (n_ads, dim) float32, L2-normalised
    offset_feature: str | None = None  # margin = logit(this feature) + trees (models.ranker.base_margin)
    compiled: Any | None = None  # lleaves predictor of the raw margin, when available
    manifest: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cpu_tower: CpuUserTower | None = field(default=None, init=False, repr=False)  # built on first CPU use
    _unread: frozenset[str] | None = field(default=None, init=False, repr=False)  # found on first use

    def user_vector(self, user_features: Mapping[str, Any]) -> np.ndarray:
        """(dim,) float32 L2-normalised vector of one user_activity row (serving: one per request)."""
        if self.device.type == "cpu":
            return self._numpy_tower().one(user_features, self.tower.config)
        return self.user_vectors([user_features])[0]

    def user_vectors(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(n, dim) float32 vectors of user_activity rows: torch on CUDA, its numpy twin on the CPU."""
        inputs = encode_users(rows, self.tower.config)
        if self.device.type == "cpu":
            return self._numpy_tower()(inputs)
        with torch.inference_mode():
            return self.tower.user_tower(to_tensors(inputs, self.device)).cpu().numpy()

    def _numpy_tower(self) -> CpuUserTower:
        if self._cpu_tower is None:
            self._cpu_tower = CpuUserTower(self.tower)
        return self._cpu_tower

    def embed_ads(self, ad_rows: pd.DataFrame | Mapping[str, Sequence[Any]]) -> np.ndarray:
        """(n, dim) float32 vectors of catalog ads (columns ad_id, category, campaign_id, advertiser_id).

        An ad unseen in training gets its vector from its hashed attributes (see models.two_tower).
        """
        columns = {c: list(ad_rows[c]) for c in AD_ATTRIBUTES if c in ad_rows}
        batch = to_tensors(encode_ads(columns, self.tower.config), self.device)
        with torch.inference_mode():
            return self.tower.ad_tower(batch).cpu().numpy()

    def set_catalog(self, ad_rows: pd.DataFrame | Mapping[str, Sequence[Any]]) -> None:
        """Replace ad_ids / ad_matrix with a catalog's vectors (at load or on a catalog change, not per request)."""
        self.ad_matrix = self.embed_ads(ad_rows)
        self.ad_ids = [str(a) for a in ad_rows["ad_id"]]

    def nearest(self, user_vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices into ad_ids, cosine scores) of the k ads most similar to a user vector, best first."""
        scores = self.ad_matrix @ user_vector  # (n_ads,)
        k = min(k, scores.size)
        top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def predict_ctr(
        self,
        user_features: Mapping[str, Any],
        ad_frame: pd.DataFrame | Mapping[str, Any],
        context: Mapping[str, Any],
        embedding_scores: np.ndarray,
    ) -> np.ndarray:
        """(n_candidates,) calibrated click probabilities of one request.

        ad_frame: ad_id, category, campaign_id (optional position) and the ad_performance columns of the
        candidates (absent -> an ad no event has touched). context: ts_ms (request time, epoch ms),
        optional hour (default: from ts_ms, UTC), device, position (default 1: score as if shown first),
        slate_size (number of ads shown together; default: the number of candidates).
        embedding_scores: (n_candidates,) cosine of user_vector and each candidate's ad vector.
        """
        x = request_features(user_features, ad_frame, context, embedding_scores, self.feature_names,
                             skip=self.unread_features())  # fmt: skip
        return self.calibrator(self.predict_margin(x))

    def predict_ctr_many(
        self,
        users: Sequence[Mapping[str, Any]],
        ad_frames: Sequence[pd.DataFrame | Mapping[str, Any]],
        contexts: Sequence[Mapping[str, Any]],
        embedding_scores: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """`predict_ctr` of several requests (one entry each) in one ranker call: their feature matrices are
        stacked, so the compiled predictor's and the calibrator's fixed cost is paid once per batch. Each
        row's prediction depends on that row only, so every request's output equals its own `predict_ctr`."""
        skip = self.unread_features()
        blocks = [request_features(u, f, c, e, self.feature_names, skip=skip)
                  for u, f, c, e in zip(users, ad_frames, contexts, embedding_scores, strict=True)]  # fmt: skip
        if not blocks:
            return []
        p = self.calibrator(self.predict_margin(np.vstack(blocks)))
        return np.split(p, np.cumsum([len(b) for b in blocks])[:-1])

    def unread_features(self) -> frozenset[str]:
        """Features no tree splits on (besides the margin's offset): their values cannot change a prediction,
        so serving does not compute them (`python -m bench.select_path` prints how many its ranker reads)."""
        if self._unread is None:
            splits = self.booster.feature_importance("split")
            unread = {name for name, count in zip(self.feature_names, splits, strict=True) if count == 0}
            self._unread = frozenset(unread - {self.offset_feature})
        return self._unread

    def predict_margin(self, x: np.ndarray) -> np.ndarray:
        """Margin (log-odds before calibration) of a feature matrix: base margin + the trees' raw score,
        from the compiled predictor when present, else LightGBM."""
        offset = base_margin(x, self.feature_names, self.offset_feature)
        if self.compiled is not None:
            return offset + self.compiled.predict(np.ascontiguousarray(x, dtype=np.float64), n_jobs=1)
        return offset + self.booster.predict(x, raw_score=True, num_threads=1)
