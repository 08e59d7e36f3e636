"""Ad selection without FastAPI: features -> eligibility -> retrieve -> rank -> choose.

    read user features once (time-bounded; fallback reason on failure)
    eligibility over the whole catalog, vectorised: flight, budget pacing, slot formats,
        frequency caps from the user's live `freq_*` features, bcat / badv, candidate and exclude lists
    arm: a stable blake2b hash of the user id puts `control_share` of users in the control arm
    targeted: user vector -> top-K eligible ads per requested format by dot product -> pCTR (ranker)
    control: every eligible ad, uniformly at random (no targeting)
    choose per slot: argmax of pCTR x bid with epsilon-greedy exploration; the propensity of the
        chosen ad under this policy is returned (and logged with the impression)

Eligibility is applied before the top-K, not after it: masking the similarity vector costs the
same, and a user whose top ads are all capped still gets K eligible candidates.
Fallback (`no_model`, `model_error`, `redis_down`, `redis_slow`, `features_error`): without a
model, or when the model fails, candidates are ranked by live ad CTR x bid; without features the
model still ranks (an unknown user) but the result is flagged. No Python loop runs per candidate:
loops run over slots, picks and the user's own frequency entries.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from features.aggregates import CTR_PRIOR
from models.ranker import AdColumns, ad_columns
from serving.catalog import IAB_CATEGORY, Catalog
from serving.features_access import AdStats, GuardedReader
from serving.pacing import DAY_S, Pacer
from serving.protocols import AD_STAT_COLUMNS, ModelBundle
from serving.retrieval import AdIndex, top_k_indexed

log = logging.getLogger(__name__)
FALLBACK_VERSION = "fallback-ctr-x-bid"
INDEX_MIN_ADS = 200_000  # catalogs from this size are searched through an approximate index (serving.retrieval)
AD_COLUMNS = ("ad_id", "category", "campaign_id", "advertiser_id")  # what embed_ads gets of an unseen ad
UserRead = tuple[dict[str, Any], str | None, float]  # (features, fallback reason or None, seconds it took)


@dataclass(frozen=True)
class Slot:
    slot_id: str
    format: str
    count: int = 1
    position: int | None = None  # where the slot sits on the page (context only)
    floor_cpm: float = 0.0  # USD; an ad is eligible only if its eCPM reaches it
    deal_ids: tuple[str, ...] = ()  # PMP deals offered for this slot
    deal_floors: tuple[float, ...] = ()  # eCPM floor of each deal (same order)
    private: bool = False  # private auction: deal ads only, at their deal's floor


@dataclass(frozen=True)
class SelectionRequest:
    request_id: str
    user_id: str
    slots: list[Slot]
    context: dict[str, Any] = field(default_factory=dict)
    candidate_ad_ids: list[str] | None = None
    exclude_ad_ids: list[str] = field(default_factory=list)
    blocked_categories: list[str] = field(default_factory=list)  # plain names or IAB codes (prefix match)
    blocked_domains: list[str] = field(default_factory=list)  # advertiser domains


@dataclass
class Choice:
    row: int
    ad_id: str
    campaign_id: str
    slot_id: str
    rank: int  # 1 = first in its slot
    pctr: float
    bid: float  # CPC, USD
    price: float  # eCPM, USD = 1000 x pCTR x bid
    propensity: float
    deal_id: str | None = None
    category: str | None = None  # logged with the impression: the ranker's training rows need it
    advertiser_id: str | None = None


@dataclass
class SelectionResult:
    request_id: str
    user_id: str
    arm: str  # targeted | control
    model_version: str
    fallback: str | None
    slots: dict[str, list[Choice]]
    n_eligible: int
    n_candidates: int
    timings: dict[str, float]  # stage -> seconds


@dataclass(frozen=True)
class SelectionConfig:
    top_k: int = 200  # candidates per requested format that reach the ranker
    epsilon: float = 0.05  # exploration probability per pick
    epsilon_no_model: float | None = None  # per pick while no model is promoted (cold start); None = epsilon
    control_share: float = 0.1  # share of users in the control arm
    control_salt: str = "adloop-arm-v1"  # change to re-draw the arms


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
        self.ad_matrix = _align(catalog, model) if model is not None else None  # (n, d) float32
        device = getattr(model, "device", None)
        self.device = device if isinstance(device, torch.device) and device.type == "cuda" else None
        self.device_matrix = None if self.device is None else torch.from_numpy(self.ad_matrix).to(self.device)
        use_index = self.ad_matrix is not None and self.device is None and len(catalog) >= index_min_ads
        self.index = AdIndex(self.ad_matrix) if use_index else None
        self.domain_code = {d: i for i, d in enumerate(catalog.advertiser_domains)}
        self.iab = [IAB_CATEGORY.get(c, c) for c in catalog.categories]
        self.text_columns = {  # (n,) object arrays of ids as text, for the ranker's ad_frame
            "campaign_id": np.array(catalog.campaign_ids, dtype=object)[catalog.campaign_code],
            "advertiser_id": np.array(catalog.advertiser_ids, dtype=object)[catalog.advertiser_code],
            "category": np.array(catalog.categories, dtype=object)[catalog.category_code],
        }
        self._live: tuple[int, np.ndarray] | None = None
        self._ad_columns: tuple[object, AdColumns] | None = None
        self._format_masks: dict[frozenset[str], np.ndarray] = {}
        order = np.argsort(catalog.campaign_code, kind="stable")  # the rows of each campaign, for frequency caps
        self.campaign_rows = np.split(
            order, np.cumsum(np.bincount(catalog.campaign_code, minlength=len(catalog.campaign_ids)))[:-1]
        )

    def ad_columns(self, stats: AdStats) -> AdColumns:
        """The ranker's columns of every catalog ad (`models.ranker.ad_columns`) for the current ad stats:
        built once per refresh (~2 ms for 10,000 ads), so a request only takes its candidates' rows."""
        columns = stats.columns  # one read: a refresh swaps the whole dict, possibly for another catalog
        same = stats.catalog_version == self.catalog.version and len(columns["ad_ctr_7d"]) == len(self.catalog)
        key = columns if same else None
        cached = self._ad_columns
        if cached is None or cached[0] is not key:
            n = len(self.catalog)
            if not same:  # stats of another catalog (a reload in between): priors, as `Selector.select_with`
                columns = {name: np.zeros(n) for name in AD_STAT_COLUMNS} | {"ad_ctr_24h": np.full(n, CTR_PRIOR)}
            frame = {"ad_id": self.catalog.ad_ids, **self.text_columns, "bid": self.catalog.bid, **columns}
            cached = self._ad_columns = (key, ad_columns(frame))
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


def arm_of(user_id: str, *, share: float, salt: str) -> str:
    """Stable across processes and restarts: blake2b of salt + user id, as a fraction of 2^64."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return "control" if int.from_bytes(digest, "big") / 2**64 < share else "targeted"


class Selector:
    def __init__(
        self, state: ServingState, config: SelectionConfig, *, pacer: Pacer, ad_stats: AdStats, features: GuardedReader
    ):
        self.state = state  # swapped whole by reload; a request reads it once
        self.config = config
        self.pacer = pacer
        self.ad_stats = ad_stats
        self.features = features
        self._local = threading.local()

    def select(
        self,
        request: SelectionRequest,
        *,
        state: ServingState | None = None,
        now: float | None = None,
        user_read: UserRead | None = None,
    ) -> SelectionResult:
        """`state`: the snapshot the caller will also use to read the result's rows (default: the current one).
        `user_read`: the user's features as already read (`read_user`); read here when None."""
        state, timings = state or self.state, {}
        user, fallback = self._user(request, user_read, timings)
        result = self.select_with(state, request, user, fallback=fallback, now=now, timings=timings)
        timings["total_select"] = sum(timings.values())
        return result

    def select_with(
        self,
        state: ServingState,
        request: SelectionRequest,
        user: dict[str, Any],
        *,
        fallback: str | None = None,
        now: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> SelectionResult:
        """Selection for known user features (tests call this directly)."""
        timings = {} if timings is None else timings
        now = time.time() if now is None else now
        p = self._prepare(state, request, user, fallback, now, timings)
        clock = time.perf_counter()
        if p.arm == "control":
            p.cands = np.flatnonzero(p.eligible)
            p.pctr = p.ctr[p.cands]
        else:
            p.cands, p.pctr, reason = self._targeted(state, request, user, p.eligible, p.slot_masks, p.ctr, now)
            p.fallback = p.fallback or reason
            if reason is not None:
                p.model_version = FALLBACK_VERSION
        timings["rank"], _ = _lap(clock)
        return self._finish(state, p)

    def select_many(
        self,
        items: Sequence[tuple[SelectionRequest, UserRead | None]],
        *,
        state: ServingState | None = None,
        now: float | None = None,
    ) -> list[SelectionResult]:
        """`select` of several requests scored together (`serving.pipeline` batches concurrent requests):
        eligibility per request, then for the targeted ones one user-tower call, one retrieval matmul and one
        ranker call over all their candidates, then each request's choice in order. Every result equals what
        `select` gives the same request with the same random draws (tests/serving/test_batching.py); the
        shared stages' time is split evenly over the requests that took part."""
        state = state or self.state
        now = time.time() if now is None else now
        prepared = []
        for request, user_read in items:
            timings: dict[str, float] = {}
            user, fallback = self._user(request, user_read, timings)
            prepared.append(self._prepare(state, request, user, fallback, now, timings))
        clock = time.perf_counter()
        targeted = [p for p in prepared if p.arm == "targeted"]
        for p, ranked in zip(targeted, self._targeted_many(state, targeted, now), strict=True):
            p.cands, p.pctr, reason = ranked
            p.fallback = p.fallback or reason
            if reason is not None:
                p.model_version = FALLBACK_VERSION
        shared, clock = _lap(clock)
        results = []
        for p in prepared:
            if p.arm == "control":
                p.cands = np.flatnonzero(p.eligible)
                p.pctr = p.ctr[p.cands]
            p.timings["rank"] = shared / max(1, len(targeted)) if p.arm == "targeted" else 0.0
            result = self._finish(state, p)
            result.timings["total_select"] = sum(result.timings.values())
            results.append(result)
        return results

    def _prepare(self, state, request, user, fallback, now, timings) -> _Prepared:
        """The per-request steps before ranking: arm, eligibility, slot masks, the live CTR column."""
        catalog, clock = state.catalog, time.perf_counter()
        arm = arm_of(request.user_id, share=self.config.control_share, salt=self.config.control_salt)
        eligible = self._eligible(state, request, user, now)
        slot_masks = {s.slot_id: self._slot_mask(catalog, s, eligible) for s in request.slots}
        timings["eligibility"], _ = _lap(clock)
        ctr = self.ad_stats.columns["ad_ctr_24h"] if self.ad_stats.catalog_version == catalog.version else None
        if ctr is None:
            ctr = np.full(len(catalog), CTR_PRIOR)
        return _Prepared(request, user, fallback, arm, eligible, slot_masks, ctr, timings, state.model_version)

    def _finish(self, state: ServingState, p: _Prepared) -> SelectionResult:
        """Choose per slot from the ranked candidates: the per-request step after ranking."""
        clock = time.perf_counter()
        eps = 1.0 if p.arm == "control" else self.config.epsilon
        if p.fallback == "no_model" and self.config.epsilon_no_model is not None:
            eps = self.config.epsilon_no_model  # cold start: explore, so the first model learns from varied ads
        slots = self._choose(state.catalog, p.request, eps, p.cands, p.pctr, p.slot_masks)
        p.timings["choose"], _ = _lap(clock)
        return SelectionResult(p.request.request_id, p.request.user_id, p.arm, p.model_version, p.fallback, slots,
                               int(p.eligible.sum()), len(p.cands), p.timings)  # fmt: skip

    def _targeted_many(self, state: ServingState, batch: list[_Prepared], now: float) -> list[tuple]:
        """`_targeted` of each request, the model's work done once for the batch."""
        if not batch:
            return []
        if len(batch) == 1 and state.device is None:  # on the CPU the one-user forward is cheaper than a batch
            p = batch[0]
            return [self._targeted(state, p.request, p.user, p.eligible, p.slot_masks, p.ctr, now)]
        catalog, k, model = state.catalog, self.config.top_k, state.model
        if model is not None:
            try:
                vectors = model.user_vectors([p.user for p in batch])  # (b, d): one tower call
                known = np.flatnonzero(np.any(vectors, axis=1))
                retrieved = _retrieve(state, vectors, [batch[j].slot_masks for j in known], k)
                row_of = {int(j): r for r, j in enumerate(known)}
                columns = state.ad_columns(self.ad_stats)
                cands_of, frames, scores = [], [], []
                for j, p in enumerate(batch):
                    if j in row_of:
                        cands, score = retrieved[row_of[j]]
                        scores.append(score)
                    else:  # unknown user: retrieve by expected value, rank with the model (as `_targeted`)
                        cands = _top_k(p.ctr * catalog.bid, p.slot_masks.values(), k)
                        scores.append(np.zeros(len(cands), dtype=np.float32))
                    cands_of.append(cands)
                    frames.append(columns.take(cands))
                contexts = [_ranker_context(p.request, now) for p in batch]
                pctrs = model.predict_ctr_many([p.user for p in batch], frames, contexts, scores)  # one ranker call
                return [(c, np.asarray(pc, float), None) for c, pc in zip(cands_of, pctrs, strict=True)]
            except Exception:
                log.exception("batched model scoring failed; falling back to CTR x bid")
                reason = "model_error"
        else:
            reason = "no_model"
        out = []
        for p in batch:
            cands = _top_k(p.ctr * catalog.bid, p.slot_masks.values(), k)
            out.append((cands, p.ctr[cands], reason))
        return out

    def _user(
        self, request: SelectionRequest, user_read: UserRead | None, timings: dict[str, float]
    ) -> tuple[dict[str, Any], str | None]:
        """(features, fallback) as already read, or read here; the read's time goes into `timings`."""
        if user_read is not None:
            user, fallback, timings["features"] = user_read
            return user, fallback
        clock = time.perf_counter()
        user, fallback = self.features.user(request.user_id)
        timings["features"], _ = _lap(clock)
        return user, fallback

    async def read_user(self, user_id: str) -> UserRead:
        """The user's features awaited without blocking the event loop (the API's routes)."""
        clock = time.perf_counter()
        user, fallback = await self.features.user_async(user_id)
        return user, fallback, time.perf_counter() - clock

    def charge(self, state: ServingState, result: SelectionResult) -> dict[tuple[str, str], float]:
        """Charge the CPM ads served (CPM bid / 1000 each; CPC ads pay on their tracked click) to the pacing
        ledger; (slot id, ad id) -> USD charged, logged with the impression."""
        catalog = state.catalog
        chosen = [c for picks in result.slots.values() for c in picks if catalog.cpm[c.row]]
        if not chosen:
            return {}
        rows = np.fromiter((c.row for c in chosen), dtype=np.int64, count=len(chosen))
        amounts = catalog.bid[rows] / 1000
        self.pacer.charge(catalog, rows, amounts)
        return {(c.slot_id, c.ad_id): float(a) for c, a in zip(chosen, amounts, strict=True)}

    # --- steps ------------------------------------------------------------------------------

    def _eligible(self, state: ServingState, request: SelectionRequest, user: dict, now: float) -> np.ndarray:
        catalog = state.catalog
        mask = state.live(int(now // DAY_S)) & self.pacer.allowed(catalog, now)
        mask &= state.format_mask(frozenset(s.format for s in request.slots))
        if request.candidate_ad_ids is not None:
            allowed = np.zeros(len(catalog), dtype=bool)
            allowed[_rows(catalog, request.candidate_ad_ids)] = True
            mask &= allowed
        if request.exclude_ad_ids:
            mask[_rows(catalog, request.exclude_ad_ids)] = False
        if request.blocked_categories:
            blocked = np.array(
                [
                    _blocked(name, iab, request.blocked_categories)
                    for name, iab in zip(catalog.categories, state.iab, strict=True)
                ]
            )
            mask &= ~blocked[catalog.category_code]
        if request.blocked_domains:
            codes = [state.domain_code[d.lower()] for d in request.blocked_domains if d.lower() in state.domain_code]
            if codes:
                mask &= ~np.isin(catalog.advertiser_code, codes)
        mask[self._capped(state, user)] = False
        return mask

    def _capped(self, state: ServingState, user: dict) -> np.ndarray:
        """Rows of the ads over the user's 24 h frequency cap, per ad or per campaign (the user's few entries
        are looked up, not the whole catalog scanned)."""
        catalog = state.catalog
        ad_rows, ad_counts = _pairs(catalog.index, user.get("freq_ad_ids"), user.get("freq_ad_impressions_24h"))
        caps = catalog.cap_ad[ad_rows]
        capped = [ad_rows[(caps > 0) & (ad_counts >= caps)]]
        codes, counts = _pairs(
            catalog.campaign_index, user.get("freq_campaign_ids"), user.get("freq_campaign_impressions_24h")
        )
        caps = catalog.cap_campaign[codes]
        capped += [state.campaign_rows[code] for code in codes[(caps > 0) & (counts >= caps)]]
        return np.concatenate(capped)

    def _slot_mask(self, catalog: Catalog, slot: Slot, eligible: np.ndarray) -> np.ndarray:
        mask = eligible & catalog.format_masks[slot.format]
        if slot.private:
            in_deal = np.zeros(len(catalog), dtype=bool)
            for deal in slot.deal_ids:
                if deal in catalog.deals:
                    in_deal[catalog.deals[deal]] = True
            mask &= in_deal
        return mask

    def _targeted(self, state, request, user, eligible, slot_masks, ctr, now):
        """(candidate rows, pCTR, fallback reason): model ranking, or CTR x bid without a model."""
        catalog, k = state.catalog, self.config.top_k
        context = _ranker_context(request, now)
        if state.model is not None:
            try:
                u = state.model.user_vector(user)  # (d,)
                if np.any(u):
                    if state.index is not None:
                        cands = top_k_indexed(state.index, u, slot_masks.values(), k)
                        scores = state.ad_matrix[cands] @ u
                    else:
                        sims = state.ad_matrix @ u  # (n,)
                        cands = _top_k(sims, slot_masks.values(), k)
                        scores = sims[cands]
                    frame = state.ad_columns(self.ad_stats).take(cands)  # AD_FRAME_COLUMNS and more
                    pctr = np.asarray(state.model.predict_ctr(user, frame, context, scores), float)
                    return cands, pctr, None
                score = catalog.expected_value(slice(None), ctr)  # unknown user: retrieve by value, rank by model
                cands = _top_k(score, slot_masks.values(), k)
                frame = state.ad_columns(self.ad_stats).take(cands)  # AD_FRAME_COLUMNS and more
                zeros = np.zeros(len(cands), dtype=np.float32)
                pctr = np.asarray(state.model.predict_ctr(user, frame, context, zeros), float)
                return cands, pctr, None
            except Exception:
                log.exception("model scoring failed; falling back to CTR x bid")
                reason = "model_error"
        else:
            reason = "no_model"
        cands = _top_k(catalog.expected_value(slice(None), ctr), slot_masks.values(), k)
        return cands, ctr[cands], reason

    def _choose(self, catalog, request, eps, cands, pctr, slot_masks) -> dict[str, list[Choice]]:
        rng = self._rng()
        ev = catalog.expected_value(cands, pctr)  # (c,) expected USD per impression (CPC or CPM)
        ecpm = 1000.0 * ev
        free = np.ones(len(cands), dtype=bool)  # an ad appears once per request
        out: dict[str, list[Choice]] = {}
        for slot in request.slots:
            floor = _floor(catalog, slot)
            ok_slot = slot_masks[slot.slot_id][cands] & (ecpm >= (floor if np.isscalar(floor) else floor[cands]))
            picks: list[Choice] = []
            for rank in range(1, slot.count + 1):
                ok = ok_slot & free
                n = int(ok.sum())
                if n == 0:
                    break
                greedy = int(np.argmax(np.where(ok, ev, -np.inf)))
                pick = int(rng.choice(np.flatnonzero(ok))) if rng.random() < eps else greedy
                propensity = (1.0 - eps) * (pick == greedy) + eps / n
                free[pick] = False
                row = int(cands[pick])
                picks.append(
                    Choice(
                        row,
                        catalog.ad_ids[row],
                        catalog.campaign_ids[catalog.campaign_code[row]],
                        slot.slot_id,
                        rank,
                        float(pctr[pick]),
                        float(catalog.bid[row]),
                        float(ecpm[pick]),
                        float(propensity),
                        _deal_of(catalog, row, slot, float(ecpm[pick])),
                        catalog.categories[catalog.category_code[row]],
                        catalog.advertiser_ids[catalog.advertiser_code[row]],
                    )
                )
            out[slot.slot_id] = picks
        return out

    def _rng(self) -> np.random.Generator:
        rng = getattr(self._local, "rng", None)
        if rng is None:
            rng = self._local.rng = np.random.default_rng()
        return rng


# --- helpers ------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """One request between its per-request steps (eligibility before, choice after) and the ranking."""

    request: SelectionRequest
    user: dict[str, Any]
    fallback: str | None
    arm: str
    eligible: np.ndarray  # (n,) bool
    slot_masks: dict[str, np.ndarray]
    ctr: np.ndarray  # (n,) live ad CTR (the fallback ranking and the control arm's pCTR)
    timings: dict[str, float]
    model_version: str
    cands: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    pctr: np.ndarray = field(default_factory=lambda: np.empty(0))


def _ranker_context(request: SelectionRequest, now: float) -> dict[str, Any]:
    """The ranker's context: request time and the number of ads shown together."""
    return {**request.context, "ts_ms": int(now * 1000), "slate_size": sum(s.count for s in request.slots)}


def _align(catalog: Catalog, model: ModelBundle) -> np.ndarray:
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


def _retrieve(state: ServingState, vectors: np.ndarray, slot_masks: list[dict[str, np.ndarray]], k: int):
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
        cands = _top_k(score, masks.values(), k)
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


def _top_k(score: np.ndarray, masks, k: int) -> np.ndarray:
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


def _pairs(index: dict[str, int], ids, counts) -> tuple[np.ndarray, np.ndarray]:
    """Rows (or codes) and counts of the user's frequency entries that the catalog knows."""
    if not ids or not counts:
        return np.empty(0, dtype=np.int64), np.empty(0)
    found = [(index[i], c) for i, c in zip(ids, counts, strict=False) if i in index]
    if not found:
        return np.empty(0, dtype=np.int64), np.empty(0)
    rows, values = zip(*found, strict=True)
    return np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _rows(catalog: Catalog, ad_ids: list[str]) -> np.ndarray:
    return np.fromiter((catalog.index[a] for a in ad_ids if a in catalog.index), dtype=np.int64)


def _blocked(name: str, iab: str, blocked: list[str]) -> bool:
    return any(b in (name, iab) or iab.startswith(b + "-") for b in blocked)


def _floor(catalog: Catalog, slot: Slot) -> float | np.ndarray:
    """The slot's eCPM floor: a number, or per ad (n,) when deals offer their own floors."""
    if not slot.deal_ids:
        return slot.floor_cpm
    floor = np.full(len(catalog), np.inf if slot.private else slot.floor_cpm)
    for deal, deal_floor in zip(slot.deal_ids, slot.deal_floors, strict=True):
        rows = catalog.deals.get(deal)
        if rows is not None:
            floor[rows] = np.minimum(floor[rows], deal_floor)
    return floor


def _deal_of(catalog: Catalog, row: int, slot: Slot, price: float) -> str | None:
    """The first offered deal this ad belongs to whose floor its price meets."""
    for deal, deal_floor in zip(slot.deal_ids, slot.deal_floors, strict=True):
        rows = catalog.deals.get(deal)
        if rows is not None and row in rows and price >= deal_floor:
            return deal
    return None


def _lap(clock: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - clock, now
