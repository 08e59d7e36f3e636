"""A seeded synthetic population that browses a shop and clicks ads by hidden preferences (SYNTHETIC data).

Each user has a hidden preference over `CATEGORIES` (a Dirichlet draw, so most users care about
a few categories), a device, a country and an activity level. `events(n)` is their browsing in
time order: page views and searches in categories drawn from the preference, then now and then
a favorite, add-to-cart or purchase of the item just viewed. `click_probability(user, category)`
turns the same preference into a click rate, so ads targeted at a user's preferred categories
get clearly more clicks than random ones; `clicks(user, ad)` draws that click from its own
seeded generator, and `click_event(impression)` turns a served `ad_impression` into the
user's `ad_click` (or None). Pure: no Kafka here (the CLI sends the events). Every event has
`source="simulate"` and `context.synthetic = true`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from streaming.events import SCHEMA_VERSION, Event, EventType

SOURCE = "simulate"
CATEGORIES = ("shoes", "dresses", "bags", "jackets", "jeans", "watches", "sportswear", "beauty", "books", "electronics",
              "games", "home", "garden", "toys", "food", "pets", "music", "travel", "outdoor", "kids")  # fmt: skip
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_SHARES = (0.6, 0.3, 0.1)
COUNTRIES = ("US", "GB", "DE", "FR", "JP", "BR", "IN")
COUNTRY_SHARES = (0.35, 0.15, 0.12, 0.1, 0.1, 0.09, 0.09)
DEFAULT_START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
SESSION_GAP = timedelta(minutes=30)  # a user idle this long starts a new session


@dataclass(frozen=True)
class SimConfig:
    """The population's shape; the same config and seed give the same users, events and clicks."""

    users: int = 1_000
    seed: int = 7
    items_per_category: int = 50
    preference_concentration: float = 0.2  # Dirichlet alpha per category: small = few favourite categories
    events_per_second: float = 20.0  # whole population, event time (not wall time)
    start: datetime = DEFAULT_START
    # Funnel after a page view of an item: next event on the same item (else browse on)
    p_favorite: float = 0.06
    p_cart: float = 0.08
    p_purchase_after_cart: float = 0.35
    p_search: float = 0.12  # a browsing step is a search instead of a page view
    # Ad clicks: p = base_ctr * (floor + (1 - floor) * K * preference), capped
    base_ctr: float = 0.02  # click rate of an ad in a category of average preference (1/K)
    ctr_floor: float = 0.1  # share of base_ctr left for categories a user does not care about
    max_ctr: float = 0.5


@dataclass(frozen=True)
class User:
    user_id: str
    preference: np.ndarray  # (K,) hidden category weights, sums to 1
    device: str
    country: str
    activity: float  # relative share of the population's events


class Population:
    """Synthetic users with hidden preferences: their browsing events and their reaction to ads."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 0])
        k = len(CATEGORIES)
        preferences = rng.dirichlet(np.full(k, cfg.preference_concentration), size=cfg.users)  # (users, K)
        devices = rng.choice(len(DEVICES), size=cfg.users, p=DEVICE_SHARES)
        countries = rng.choice(len(COUNTRIES), size=cfg.users, p=COUNTRY_SHARES)
        activity = rng.lognormal(0.0, 1.0, size=cfg.users)
        self.users = [
            User(f"sim-u{i:06d}", preferences[i], DEVICES[devices[i]], COUNTRIES[countries[i]], activity[i])
            for i in range(cfg.users)
        ]
        self._by_id = {user.user_id: user for user in self.users}
        self._activity = activity / activity.sum()
        self._prices = rng.lognormal(3.5, 0.8, size=(k, cfg.items_per_category)).round(2)  # (K, items)
        self._click_rng = np.random.default_rng([cfg.seed, 2])

    def user(self, user_id: str) -> User:
        try:
            return self._by_id[user_id]
        except KeyError:
            raise KeyError(f"{user_id!r} is not a simulated user (ids are sim-u000000..)") from None

    def preferred_categories(self, user_id: str, n: int = 3) -> list[str]:
        """The user's `n` most preferred categories, best first (the hidden truth, for demos and tests)."""
        order = np.argsort(-self.user(user_id).preference)[:n]
        return [CATEGORIES[i] for i in order]

    def click_probability(self, user_id: str, ad_category: str | None) -> float:
        """Probability that the user clicks an ad of this category (unknown category: the floor rate)."""
        cfg = self.config
        if ad_category not in CATEGORIES:
            return cfg.base_ctr * cfg.ctr_floor
        weight = self.user(user_id).preference[CATEGORIES.index(ad_category)] * len(CATEGORIES)
        return min(cfg.max_ctr, cfg.base_ctr * (cfg.ctr_floor + (1 - cfg.ctr_floor) * weight))

    def clicks(self, user_id: str, ad: Any) -> bool:
        """Whether the user clicks this ad (anything with a `category` attribute or key), seeded."""
        category = ad.get("category") if isinstance(ad, Mapping) else getattr(ad, "category", None)
        return bool(self._click_rng.random() < self.click_probability(user_id, category))

    def click_event(self, impression: Event, delay: timedelta = timedelta(seconds=1)) -> Event | None:
        """The user's `ad_click` on a served `ad_impression` (same request, ad, slot), or None: no click."""
        if impression.event_type is not EventType.ad_impression:
            raise ValueError(f"expected an ad_impression, got {impression.event_type.value}")
        if not self.clicks(impression.user_id, impression):
            return None
        return impression.model_copy(
            update={
                "event_id": f"{impression.event_id}-click",
                "event_type": EventType.ad_click,
                "ts": impression.ts + delay,
                "source": SOURCE,
                "propensity": None,
            }
        )

    def events(self, n: int) -> Iterator[Event]:
        """`n` browsing events of the population, in time order (same config -> same events)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 1])
        users = rng.choice(len(self.users), size=n, p=self._activity)
        gaps = rng.exponential(1.0 / cfg.events_per_second, size=n)  # (n,) seconds between events
        visits: dict[int, _Visit] = {}
        ts, sessions = cfg.start, 0
        for index in range(n):
            ts += timedelta(seconds=float(gaps[index]))
            visit = visits.get(users[index])
            if visit is None or ts - visit.ts > SESSION_GAP:
                sessions += 1
                visit = visits[users[index]] = _Visit(ts, sessions)
            visit.ts = ts
            kind = self._step(rng, self.users[users[index]], visit)
            yield self._event(index, self.users[users[index]], visit, kind)

    def _step(self, rng: np.random.Generator, user: User, visit: _Visit) -> EventType:
        """The user's next step: the funnel on the item in view, or browsing by preference (updates `visit`)."""
        cfg = self.config
        if visit.item is not None:
            draw = rng.random()
            if visit.in_cart and draw < cfg.p_purchase_after_cart:
                visit.in_cart = False
                return EventType.purchase
            if not visit.in_cart and draw < cfg.p_cart:
                visit.in_cart = True
                return EventType.add_to_cart
            if draw > 1 - cfg.p_favorite:
                return EventType.favorite
        visit.category = int(rng.choice(len(CATEGORIES), p=user.preference))
        visit.in_cart = False
        if rng.random() < cfg.p_search:
            visit.item = None
            return EventType.search
        visit.item = int(rng.integers(cfg.items_per_category))
        return EventType.page_view

    def _event(self, index: int, user: User, visit: _Visit, kind: EventType) -> Event:
        name, item = CATEGORIES[visit.category], visit.item
        return Event(
            event_id=f"sim-{self.config.seed}-{index}",
            schema_version=SCHEMA_VERSION,
            event_type=kind,
            user_id=user.user_id,
            ts=visit.ts,
            session_id=f"sim-s{self.config.seed}-{visit.session}",
            item_id=f"{name}-{item:03d}" if item is not None else None,
            category=name,
            price=float(self._prices[visit.category, item]) if item is not None else None,
            source=SOURCE,
            context={"device": user.device, "country": user.country, "synthetic": True},
        )


@dataclass
class _Visit:
    """Where a user is in the shop: the current session and the item in view."""

    ts: datetime
    session: int
    category: int = 0
    item: int | None = None
    in_cart: bool = False  # the item in view is in the cart (a purchase may follow)
