"""Which catalog ads a request may show, and at what floor: vectorised masks over the whole catalog.

Eligibility runs before retrieval, not after it (`serving.selection`): masking costs the same, and a user
whose top ads are all capped still gets K eligible candidates. Frequency caps look up the user's few
`freq_*` entries instead of scanning the catalog.
"""

from __future__ import annotations

import numpy as np

from serving.catalog import Catalog
from serving.pacing import DAY_S, Pacer
from serving.selection_types import SelectionRequest, Slot
from serving.serving_state import ServingState


def eligible(state: ServingState, pacer: Pacer, request: SelectionRequest, user: dict, now: float) -> np.ndarray:
    """(n,) bool: the catalog ads this request may show: live, within pacing, of a requested format, in its
    candidate list and not excluded, not blocked by category or advertiser domain, under the user's caps."""
    catalog = state.catalog
    mask = state.live(int(now // DAY_S)) & pacer.allowed(catalog, now)
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
    mask[capped(state, user)] = False
    return mask


def capped(state: ServingState, user: dict) -> np.ndarray:
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


def slot_mask(catalog: Catalog, slot: Slot, eligible: np.ndarray) -> np.ndarray:
    """The eligible ads of the slot's format; of its deals only, in a private auction."""
    mask = eligible & catalog.format_masks[slot.format]
    if slot.private:
        in_deal = np.zeros(len(catalog), dtype=bool)
        for deal in slot.deal_ids:
            if deal in catalog.deals:
                in_deal[catalog.deals[deal]] = True
        mask &= in_deal
    return mask


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


def floor(catalog: Catalog, slot: Slot) -> float | np.ndarray:
    """The slot's eCPM floor: a number, or per ad (n,) when deals offer their own floors."""
    if not slot.deal_ids:
        return slot.floor_cpm
    floor = np.full(len(catalog), np.inf if slot.private else slot.floor_cpm)
    for deal, deal_floor in zip(slot.deal_ids, slot.deal_floors, strict=True):
        rows = catalog.deals.get(deal)
        if rows is not None:
            floor[rows] = np.minimum(floor[rows], deal_floor)
    return floor


def deal_of(catalog: Catalog, row: int, slot: Slot, price: float) -> str | None:
    """The first offered deal this ad belongs to whose floor its price meets."""
    for deal, deal_floor in zip(slot.deal_ids, slot.deal_floors, strict=True):
        rows = catalog.deals.get(deal)
        if rows is not None and row in rows and price >= deal_floor:
            return deal
    return None
