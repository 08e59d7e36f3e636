"""The synthetic population: reproducible from its seed, and its clicks follow the hidden preferences."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import numpy as np

from streaming.simulate import CATEGORIES, Population, SimConfig


def test_same_seed_same_users_and_events() -> None:
    a, b = Population(SimConfig(users=50, seed=11)), Population(SimConfig(users=50, seed=11))
    assert [e.to_bytes() for e in a.events(300)] == [e.to_bytes() for e in b.events(300)]
    other = Population(SimConfig(users=50, seed=12))
    assert [e.to_bytes() for e in other.events(300)] != [e.to_bytes() for e in a.events(300)]


def test_events_are_synthetic_time_ordered_and_follow_preferences() -> None:
    population = Population(SimConfig(users=20, seed=3))
    events = list(population.events(3_000))
    assert all(a.ts <= b.ts for a, b in pairwise(events))
    assert all(e.source == "simulate" and e.context["synthetic"] is True for e in events)
    assert {e.event_type.value for e in events} == {"page_view", "search", "favorite", "add_to_cart", "purchase"}
    assert len({e.event_id for e in events}) == len(events)
    # A busy user's most browsed category is one of their hidden top 3
    busiest = Counter(e.user_id for e in events).most_common(1)[0][0]
    browsed = Counter(e.category for e in events if e.user_id == busiest).most_common(1)[0][0]
    assert browsed in population.preferred_categories(busiest, 3)


def test_preferred_categories_get_clearly_more_clicks() -> None:
    population = Population(SimConfig(users=200, seed=5))
    rng = np.random.default_rng(0)
    targeted = random = 0
    for user in population.users:
        best = population.preferred_categories(user.user_id, 1)[0]
        assert population.click_probability(user.user_id, best) > population.click_probability(
            user.user_id, population.preferred_categories(user.user_id, len(CATEGORIES))[-1]
        )
        for _ in range(50):
            targeted += population.clicks(user.user_id, {"category": best})
            random += population.clicks(user.user_id, {"category": CATEGORIES[rng.integers(len(CATEGORIES))]})
    assert targeted > 3 * random > 0


def test_clicks_are_seeded() -> None:
    def draws(seed: int) -> list[bool]:
        population = Population(SimConfig(users=10, seed=seed))
        return [population.clicks("sim-u000001", {"category": "shoes"}) for _ in range(200)]

    assert draws(1) == draws(1)


def test_click_event_answers_a_served_impression() -> None:
    from datetime import timedelta

    from streaming.events import Event

    population = Population(SimConfig(users=5, seed=2, base_ctr=0.5, max_ctr=1.0))
    user = population.users[0].user_id
    impression = Event(event_id="req-1-1", schema_version=1, event_type="ad_impression", user_id=user,
                       ts="2026-01-05T08:00:00Z", ad_id="ad-9", category=population.preferred_categories(user, 1)[0],
                       request_id="req-1", slot_id="top", position=1, arm="targeted", source="serving")  # fmt: skip
    assert population.click_probability(user, impression.category) == 1.0
    click = population.click_event(impression)
    assert click is not None
    assert (click.event_type.value, click.event_id, click.ad_id, click.request_id, click.arm) == (
        "ad_click",
        "req-1-1-click",
        "ad-9",
        "req-1",
        "targeted",
    )
    assert click.ts - impression.ts == timedelta(seconds=1) and click.source == "simulate"
