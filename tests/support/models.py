"""A small synthetic MIND-shaped world: training tests need no shared data."""

from __future__ import annotations

import numpy as np

from models.mind import Impression

DAY_MS = 86_400_000


START_MS = 1_700_000_000_000


def synthetic_world(n_requests: int = 600, seed: int = 0) -> tuple[dict[str, tuple[str, str]], list[Impression]]:
    """Users prefer one of 6 categories, ads have a quality; clicks follow both. Three days, time-ordered."""
    rng = np.random.default_rng(seed)
    n_ads, n_users, n_categories = 240, 150, 6
    ads = [f"A{i}" for i in range(n_ads)]
    ad_category = rng.integers(0, n_categories, n_ads)
    quality = rng.normal(0, 0.8, n_ads)
    news = {a: (f"c{ad_category[i]}", f"s{ad_category[i]}-{i % 3}") for i, a in enumerate(ads)}
    preferred = rng.integers(0, n_categories, n_users)
    times = np.sort(rng.integers(START_MS, START_MS + 3 * DAY_MS, n_requests))
    impressions = []
    for r, ts in enumerate(times):
        u = int(rng.integers(n_users))
        liked = np.flatnonzero(ad_category == preferred[u])
        history = [ads[i] for i in rng.choice(liked, 8)]
        shown = rng.choice(n_ads, 15, replace=False)
        logit = -2.5 + quality[shown] + 1.8 * (ad_category[shown] == preferred[u])
        labels = (rng.random(15) < 1 / (1 + np.exp(-logit))).astype(int).tolist()
        impressions.append(Impression(request_id=f"r{r}", user_id=f"U{u}", ts_ms=int(ts), history=history,
                                      ad_ids=[ads[i] for i in shown], labels=labels))  # fmt: skip
    return news, impressions
