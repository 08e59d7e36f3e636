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

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.aggregates import CTR_PRIOR
from serving.eligibility import deal_of, eligible, floor, slot_mask
from serving.features_access import AdStats, GuardedReader
from serving.pacing import Pacer
from serving.retrieval import top_k_indexed
from serving.selection_types import (
    Choice,
    SelectionConfig,
    SelectionRequest,
    SelectionResult,
    UserRead,
    arm_of,
)
from serving.serving_state import FALLBACK_VERSION, ServingState, retrieve, top_k

log = logging.getLogger(__name__)


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
        mask = eligible(state, self.pacer, request, user, now)
        slot_masks = {s.slot_id: slot_mask(catalog, s, mask) for s in request.slots}
        timings["eligibility"], _ = _lap(clock)
        ctr = self.ad_stats.columns["ad_ctr_24h"] if self.ad_stats.catalog_version == catalog.version else None
        if ctr is None:
            ctr = np.full(len(catalog), CTR_PRIOR)
        return _Prepared(request, user, fallback, arm, mask, slot_masks, ctr, timings, state.model_version)

    def _finish(self, state: ServingState, p: _Prepared) -> SelectionResult:
        """Choose per slot from the ranked candidates: the per-request step after ranking."""
        clock = time.perf_counter()
        eps = 1.0 if p.arm == "control" else self.config.epsilon
        if p.fallback == "no_model" and self.config.epsilon_no_model is not None:
            eps = self.config.epsilon_no_model  # cold start: explore, so the first model learns from varied ads
        slots = self._choose(state.catalog, p.request, eps, p.cands, p.pctr, p.slot_masks)
        p.timings["choose"], _ = _lap(clock)
        return SelectionResult(p.request.request_id, p.request.user_id, p.arm, p.model_version, p.fallback, slots,
                               int(np.count_nonzero(p.eligible)), len(p.cands), p.timings)  # fmt: skip

    def _targeted_many(self, state: ServingState, batch: list[_Prepared], now: float) -> list[tuple]:
        """`_targeted` of each request, the model's work done once for the batch."""
        if not batch:
            return []
        if len(batch) == 1 and state.device is None:  # on the CPU the one-user forward is cheaper than a batch
            p = batch[0]
            return [self._targeted(state, p.request, p.user, p.eligible, p.slot_masks, p.ctr, now)]
        k, model = self.config.top_k, state.model
        if model is not None:
            try:
                vectors = model.user_vectors([p.user for p in batch])  # (b, d): one tower call
                known = np.flatnonzero(np.any(vectors, axis=1))
                retrieved = retrieve(state, vectors, [batch[j].slot_masks for j in known], k)
                row_of = {int(j): r for r, j in enumerate(known)}
                columns = state.ad_columns(self.ad_stats)
                cands_of, frames, scores = [], [], []
                for j, p in enumerate(batch):
                    if j in row_of:
                        cands, score = retrieved[row_of[j]]
                        scores.append(score)
                    else:  # unknown user: retrieve by expected value, rank with the model (as `_targeted`)
                        cands = top_k(state.expected_values(p.ctr), p.slot_masks.values(), k)
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
            cands = top_k(state.expected_values(p.ctr), p.slot_masks.values(), k)
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

    def _targeted(self, state, request, user, eligible, slot_masks, ctr, now):
        """(candidate rows, pCTR, fallback reason): model ranking, or expected value without one (the auction's)."""
        k = self.config.top_k
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
                        cands = top_k(sims, slot_masks.values(), k)
                        scores = sims[cands]
                    frame = state.ad_columns(self.ad_stats).take(cands)  # AD_FRAME_COLUMNS and more
                    pctr = np.asarray(state.model.predict_ctr(user, frame, context, scores), float)
                    return cands, pctr, None
                cands = top_k(state.expected_values(ctr), slot_masks.values(), k)  # unknown user: by value
                frame = state.ad_columns(self.ad_stats).take(cands)  # AD_FRAME_COLUMNS and more
                zeros = np.zeros(len(cands), dtype=np.float32)
                pctr = np.asarray(state.model.predict_ctr(user, frame, context, zeros), float)
                return cands, pctr, None
            except Exception:
                log.exception("model scoring failed; falling back to CTR x bid")
                reason = "model_error"
        else:
            reason = "no_model"
        cands = top_k(state.expected_values(ctr), slot_masks.values(), k)
        return cands, ctr[cands], reason

    def _choose(self, catalog, request, eps, cands, pctr, slot_masks) -> dict[str, list[Choice]]:
        rng = self._rng()
        ev = catalog.expected_value(cands, pctr)  # (c,) expected USD per impression (CPC or CPM)
        ecpm = 1000.0 * ev
        free = np.ones(len(cands), dtype=bool)  # an ad appears once per request
        out: dict[str, list[Choice]] = {}
        for slot in request.slots:
            least = floor(catalog, slot)
            ok_slot = slot_masks[slot.slot_id][cands] & (ecpm >= (least if np.isscalar(least) else least[cands]))
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
                        deal_of(catalog, row, slot, float(ecpm[pick])),
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


def _lap(clock: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - clock, now
