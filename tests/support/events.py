"""Seeded synthetic events for tests: a mixed clickstream, and impressions with or without a click."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from streaming.events import Event, EventType

T0 = 1_700_000_000_000


def synthetic_events(n: int, users: int, seed: int = 7, step_ms: int = 20_000) -> list[Event]:
    """A seeded mixed stream (browsing and ad events) in time order."""
    rng = random.Random(seed)
    kinds = ["page_view", "page_view", "search", "favorite", "add_to_cart", "purchase", "ad_impression", "ad_click"]
    events = []
    for i in range(n):
        kind = rng.choice(kinds)
        ad = kind.startswith("ad_")
        user = f"user-{rng.randrange(users)}"
        events.append(
            Event(
                event_id=f"syn-{seed}-{i}",
                schema_version=1,
                event_type=kind,
                user_id=user,
                session_id=f"{user}-s{i // 400}",  # page views within a session count as article clicks
                ts=T0 + i * step_ms,
                item_id=None if ad else f"item-{rng.randrange(50)}",
                category=f"cat-{rng.randrange(6)}",
                ad_id=f"ad-{rng.randrange(8)}" if ad else None,
                campaign_id=f"camp-{rng.randrange(3)}" if ad else None,
            )
        )
    return events


IMPRESSION_T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


def impression(i: int, *, arm: str, clicked: bool, user: str | None = None, minute: int = 0) -> list[Event]:
    imp = Event(
        event_id=f"imp-{i}", schema_version=1, event_type=EventType.ad_impression, user_id=user or f"u{i % 7}",
        ts=IMPRESSION_T0 + timedelta(minutes=minute, seconds=i), ad_id=f"ad-{i % 3}", campaign_id=f"cmp-{i % 2}",
        request_id=f"req-{i}", arm=arm, model_version="m1" if i % 2 else "m2", propensity=0.5,
        context={"device": "mobile" if i % 2 else "desktop", "country": "DE"},
    )  # fmt: skip
    events = [imp]
    if clicked:
        events.append(imp.model_copy(update={"event_id": f"imp-{i}-click", "event_type": EventType.ad_click,
                                             "ts": imp.ts + timedelta(seconds=1)}))  # fmt: skip
    return events
