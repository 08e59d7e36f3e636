"""What selection takes and gives: slots, requests, choices, results, its settings, and the arm of a user."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

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


def arm_of(user_id: str, *, share: float, salt: str) -> str:
    """Stable across processes and restarts: blake2b of salt + user id, as a fraction of 2^64."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return "control" if int.from_bytes(digest, "big") / 2**64 < share else "targeted"
