"""What selection needs from the model and the feature store, as Protocols.

- `ModelBundle` / `ModelRegistry`: satisfied by `models.bundle.ModelBundle` and `models.registry.Registry`
  (and by the stand-ins of `models.testing`).
- `FeatureReader`: satisfied by `features.online.OnlineFeatureReader`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from features.aggregates import AD_FEATURES

AD_STAT_COLUMNS = AD_FEATURES  # every `ad_performance` feature, cached per ad by serving
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

    # Batches (serving scores concurrent requests together): each output equals the one-request call's.
    def user_vectors(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:  # (b, d) float32
        ...

    def predict_ctr_many(
        self,
        users: Sequence[Mapping[str, Any]],
        ad_frames: Sequence[Mapping[str, np.ndarray]],
        contexts: Sequence[Mapping[str, Any]],
        embedding_scores: Sequence[np.ndarray],
    ) -> list[np.ndarray]:  # one (k_i,) array per request
        ...


@runtime_checkable
class ModelRegistry(Protocol):
    def promoted(self) -> str | None: ...  # the promoted version, None if none

    def load(self, version: str) -> ModelBundle: ...
