"""The gate's off-policy estimate on simulated logs: the target probabilities over the remaining shown ads,
and IPS recovering the target policy's click rate when every candidate is shown (the stated assumption)."""

from __future__ import annotations

import numpy as np

from models.estimators import ips
from models.gate_ope import slate_target_probs

EPS = 0.1


def test_target_probabilities_are_epsilon_greedy_over_the_remaining_shown_ads() -> None:
    probs = slate_target_probs(np.array(["r", "r", "r", "q"]), np.array([1, 2, 3, 1]),
                               np.array([0.1, 0.9, 0.5, 0.3]), EPS)  # fmt: skip
    # rank 1: V prefers the ad at rank 2; rank 2: it is the best of the two left; rank 3: alone; q: alone
    assert np.allclose(probs, [EPS / 3, 1 - EPS + EPS / 2, 1.0, 1.0])


def test_ips_recovers_the_target_click_rate_when_every_candidate_is_shown() -> None:
    rng = np.random.default_rng(7)
    ctr = np.array([0.1, 0.5, 0.2])  # per ad, at any rank
    requests = 20_000
    order = np.argsort(rng.random((requests, 3)), axis=1)  # a uniformly random slate of all three ads
    shown = order.ravel()
    reward = (rng.random(shown.size) < ctr[shown]).astype(float)
    positions = np.tile([1, 2, 3], requests)
    propensity = 1.0 / (4 - positions)  # the logging policy's probability of each pick among those left
    target = slate_target_probs(np.repeat(np.arange(requests), 3), positions, ctr[shown], EPS)
    first = positions == 1
    estimate = ips(reward[first], propensity[first], target[first])
    truth = (1 - EPS) * ctr.max() + EPS * ctr.mean()  # V's epsilon-greedy pick among all candidates
    assert abs(estimate.value - truth) < 3 * estimate.se, (estimate, truth)
