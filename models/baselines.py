"""Baselines of the Globo protocol, scored on the same probes as the models.

- random: a seeded uniform score per candidate.
- popularity, last hour: the candidate's clicks in the hour before the event (the pool's own weights).
- popularity, decayed: every earlier click weighs 2^(-age / 1 h) (`features.article_flow`'s decayed clicks,
  the last 24 hourly sums).
- co-occurrence (session kNN): the session's last clicks vote for the articles that followed them in
  earlier sessions; the most recent click's transitions weigh 1, the two before 0.5 and 0.25
  (`features.article_flow.VOTE_WEIGHTS`). Transitions are counted online, so the vote is always as of the event.
- co-occurrence, last click: the same with the most recent click alone.
"""

from __future__ import annotations

import numpy as np

from models.probes import POOL, Probes

BASELINES = {
    "random": None,
    "popularity, last hour": POOL,
    "popularity, decayed (1 h half-life)": "pop_decayed",
    "co-occurrence (session kNN)": "cooc_vote",
    "co-occurrence, last click": "cooc_last",
}


def baseline_scores(probes: Probes, seed: int = 0) -> dict[str, np.ndarray]:
    """Name -> (E, C) scores of every baseline."""
    out = {}
    for name, feature in BASELINES.items():
        if feature is None:
            out[name] = np.random.default_rng(seed).random(probes.candidates.shape)
        else:
            out[name] = probes.features[feature]
    return out
