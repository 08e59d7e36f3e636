"""One catalog with one model, aligned for serving, and retrieval over it.

`ServingState` is replaced whole on a reload, so a request that read it once sees one catalog, one model and
the vectors and index built for both. Retrieval: exact dot products, an approximate index for large
catalogs (`serving.retrieval`), or one masked top-k on the GPU when the model runs there.
"""

from __future__ import annotations

import numpy as np
import torch

from features.aggregates import CTR_PRIOR
from models.ranker import LiveAdColumns, fixed_ad_columns
from serving.catalog import IAB_CATEGORY, Catalog
from serving.features_access import AdStats
from serving.protocols import AD_STAT_COLUMNS, ModelBundle
from serving.retrieval import AdIndex, top_k_indexed

FALLBACK_VERSION = "fallback-ctr-x-bid"
INDEX_MIN_ADS = 200_000  # catalogs from this size are searched through an approximate index (serving.retrieval)
AD_COLUMNS = ("ad_id", "category", "campaign_id", "advertiser_id")  # what embed_ads gets of an unseen ad


class ServingState:
    """One catalog with one model (or none), aligned at load time; replaced whole on reload.

    Retrieval: exact dot products (`ad_matrix`) below `index_min_ads` ads, an approximate index over the
    same vectors (`serving.retrieval.AdIndex`) from there; with the model on CUDA the ad matrix is kept on
    the device too and retrieval is exact there. Both are built here, so a reload builds them in the
    reloading thread and the swap of the whole state replaces them at once."""

    def __init__(self, catalog: Catalog, model: ModelBundle | None, *, index_min_ads: int = INDEX_MIN_ADS):
        self.catalog = catalog
        self.model = model
        self.model_version = model.version if model is not None else FALLBACK_VERSION
        self.ad_matrix = align(catalog, model) if model is not None else None  # (n, d) float32
        device = getattr(model, "device", None)
        self.device = device if isinstance(device, torch.device) and device.type == "cuda" else None
        self.device_matrix = None if self.device is None else torch.from_numpy(self.ad_matrix).to(self.device)
        use_index = self.ad_matrix is not None and self.device is None and len(catalog) >= index_min_ads
        formats = [np.flatnonzero(mask) for mask in catalog.format_masks.values()]
        self.index = AdIndex(self.ad_matrix, formats) if use_index else None
        self.domain_code = {d: i for i, d in enumerate(catalog.advertiser_domains)}
        self.iab = [IAB_CATEGORY.get(c, c) for c in catalog.categories]
        self.text_columns = {  # (n,) object arrays of ids as text, for the ranker's ad_frame
            "campaign_id": np.array(catalog.campaign_ids, dtype=object)[catalog.campaign_code],
            "advertiser_id": np.array(catalog.advertiser_ids, dtype=object)[catalog.advertiser_code],
            "category": np.array(catalog.categories, dtype=object)[catalog.category_code],
        }
        self._live: tuple[int, np.ndarray] | None = None
        self.fixed_ad_columns = fixed_ad_columns({"ad_id": catalog.ad_ids, **self.text_columns, "bid": catalog.bid})
        self._priors: dict[str, np.ndarray] | None = None  # ad stats of no ad yet (made when first needed)
        self._format_masks: dict[frozenset[str], np.ndarray] = {}
        self._values: tuple[np.ndarray, np.ndarray] | None = None
        order = np.argsort(catalog.campaign_code, kind="stable")  # the rows of each campaign, for frequency caps
        self.campaign_rows = np.split(
            order, np.cumsum(np.bincount(catalog.campaign_code, minlength=len(catalog.campaign_ids)))[:-1]
        )

    def ad_columns(self, stats: AdStats) -> LiveAdColumns:
        """The ranker's columns of every catalog ad (`models.ranker.ad_columns`) for the current ad stats: the
        fixed ones prepared with the state (off the request path), a request's candidates' ad_performance
        values when it takes them, so that no refresh costs O(catalog) on the request path."""
        columns = stats.columns  # one read: a refresh swaps the whole dict, possibly for another catalog
        if stats.catalog_version != self.catalog.version or len(columns["ad_ctr_7d"]) != len(self.catalog):
            columns = self._priors = self._priors or self._prior_stats()  # another catalog's (a reload in between)
        return LiveAdColumns(self.fixed_ad_columns, columns)

    def _prior_stats(self) -> dict[str, np.ndarray]:
        """Every ad untouched: as `Selector.select_with` ranks while the stats are another catalog's."""
        n = len(self.catalog)
        return {name: np.zeros(n) for name in AD_STAT_COLUMNS} | {"ad_ctr_24h": np.full(n, CTR_PRIOR)}

    def expected_values(self, ctr: np.ndarray) -> np.ndarray:
        """(n,) expected USD per impression of every ad at the live click rates `ctr` (the ranking without a
        model, or for a user the model does not know): computed once per ad-stats refresh, not per request."""
        cached = self._values
        if cached is None or cached[0] is not ctr:
            cached = self._values = (ctr, self.catalog.expected_value(slice(None), ctr))
        return cached[1]

    def format_mask(self, formats: frozenset[str]) -> np.ndarray:
        """(n,) bool: ads of any of `formats` (a request's slot formats), built once per format set."""
        mask = self._format_masks.get(formats)
        if mask is None:
            mask = np.zeros(len(self.catalog), dtype=bool)
            for f in formats:
                mask |= self.catalog.format_masks[f]
            self._format_masks[formats] = mask
        return mask

    def live(self, day: int) -> np.ndarray:
        cached = self._live
        if cached is None or cached[0] != day:
            cached = self._live = (day, self.catalog.live_mask(day))
        return cached[1]


def align(catalog: Catalog, model: ModelBundle) -> np.ndarray:
    """The model's ad vectors in catalog row order; ads the model has not seen are embedded now."""
    model_rows = {a: i for i, a in enumerate(model.ad_ids)}
    rows = np.array([model_rows.get(a, -1) for a in catalog.ad_ids], dtype=np.int64)
    matrix = np.zeros((len(catalog), model.ad_matrix.shape[1]), dtype=np.float32)  # (n, d)
    known = rows >= 0
    matrix[known] = model.ad_matrix[rows[known]]
    missing = np.flatnonzero(~known)
    if len(missing):
        rows = [catalog.describe(int(i)) for i in missing]
        matrix[missing] = model.embed_ads({name: [r[name] for r in rows] for name in AD_COLUMNS})  # columns
    return matrix


def retrieve(state: ServingState, vectors: np.ndarray, slot_masks: list[dict[str, np.ndarray]], k: int):
    """(candidate rows, their embedding scores) of each known user of a batch (`vectors` rows with any
    non-zero, in order): one (b, n) matmul on the CPU, per-request index searches for a large catalog, or
    one masked top-k on the device when the model runs on CUDA."""
    users = vectors[np.any(vectors, axis=1)]
    if not len(users):
        return []
    if state.device_matrix is not None:
        return _retrieve_on_device(state, users, slot_masks, k)
    if state.index is not None:
        out = []
        for u, masks in zip(users, slot_masks, strict=True):
            cands = top_k_indexed(state.index, u, masks.values(), k)
            out.append((cands, state.ad_matrix[cands] @ u))
        return out
    sims = users @ state.ad_matrix.T  # (b, n): one retrieval call for the batch
    out = []
    for score, masks in zip(sims, slot_masks, strict=True):
        cands = top_k(score, masks.values(), k)
        out.append((cands, score[cands]))
    return out


def _retrieve_on_device(state: ServingState, users: np.ndarray, slot_masks: list[dict[str, np.ndarray]], k: int):
    """Exact retrieval on the GPU: one (b, n) matmul against the device-resident ad matrix, every (request,
    slot) mask applied there and one top-k over all of them; only the k rows per mask come back."""
    device, matrix = state.device, state.device_matrix
    owner = [i for i, masks in enumerate(slot_masks) for _ in masks]  # request of each mask
    stacked = np.stack([m for masks in slot_masks for m in masks.values()])  # (m, n) bool
    with torch.inference_mode():
        sims = torch.from_numpy(users).to(device, non_blocking=True) @ matrix.T  # (b, n)
        masked = sims[torch.as_tensor(owner, device=device)]
        masked.masked_fill_(~torch.from_numpy(stacked).to(device, non_blocking=True), -torch.inf)
        values, rows = masked.topk(min(k, matrix.shape[0]), dim=1)
        values, rows = values.cpu().numpy(), rows.cpu().numpy()  # the one wait for the device
    picked: list[list[np.ndarray]] = [[] for _ in slot_masks]
    for i, (v, r) in enumerate(zip(values, rows, strict=True)):
        picked[owner[i]].append(r[np.isfinite(v)])
    out = []
    for u, rows_of in zip(users, picked, strict=True):
        cands = np.unique(np.concatenate(rows_of)) if rows_of else np.empty(0, dtype=np.int64)
        out.append((cands, state.ad_matrix[cands] @ u))
    return out


def top_k(score: np.ndarray, masks, k: int) -> np.ndarray:
    """Union over masks of the k best-scoring rows inside each mask (sorted row indices)."""
    picked = []
    for mask in masks:
        rows = np.flatnonzero(mask)
        if len(rows) > k:
            rows = rows[np.argpartition(-score[rows], k - 1)[:k]]
        picked.append(rows)
    if len(picked) == 1:
        return np.sort(picked[0])  # rows of one mask are distinct already: np.unique would hash them
    return np.unique(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
