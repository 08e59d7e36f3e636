"""Off-policy evaluation checked on the Open Bandit Dataset: each logging policy's click rate estimated
from the other policy's logs, against the click rate actually observed under it.

OBD logged two policies side by side on the same pages and days: `random` (uniform) and `bts`
(Bernoulli Thompson sampling). A row is one item shown at one of three positions, so the action
is (item, position) and a policy is a distribution over the 80 items per position; both are
context-free (neither looks at the user features).

Target probability of the logged action, e(a_i | x_i):
- random as target: 1 / n_items at every position (the random log's propensity_score is exactly that).
- bts as target: BTS's probabilities change as its posterior is updated, and the data set logs
  them only for the item BTS chose. We use BTS's time-averaged distribution per position, read off
  the BTS log as the share of that position's rows that showed the item,
  e(item | position) = n_bts(item, position) / n_bts(position). This is the marginal distribution
  whose value the BTS log's observed click rate measures. (The mean of the logged propensities
  over the rows that showed an item would be biased upwards: rows are drawn more often at the
  times when that item's probability was high.)
Behaviour propensities are the logged `propensity_score` of the behaviour log.
The reward model of DR is the per-(item, position) click rate of the behaviour log, cross-fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.estimators import Estimate, cross_fitted_rates, doubly_robust, ips, snips, wilson

POLICIES = ("random", "bts")


@dataclass(frozen=True)
class OpeCheck:
    target: str  # the policy evaluated
    behaviour: str  # the policy whose logs were used
    rows: int
    observed: Estimate  # click rate in the target policy's own log (binomial SE)
    ips: Estimate
    snips: Estimate
    dr: Estimate

    def z(self, name: str) -> float:
        """(estimate - observed) / combined SE: the two come from independent logs."""
        est = getattr(self, name)
        return (est.value - self.observed.value) / float(np.hypot(est.se, self.observed.se))


def load(root: Path, policy: str, campaign: str = "all") -> pd.DataFrame:
    """`<root>/<policy>/<campaign>/<campaign>.csv`, the columns OPE needs."""
    path = Path(root) / policy / campaign / f"{campaign}.csv"
    return pd.read_csv(path, usecols=["item_id", "position", "click", "propensity_score"])


def check(root: Path, target: str, campaign: str = "all") -> OpeCheck:
    """Estimate `target`'s click rate from the other policy's log; compare with `target`'s own log."""
    behaviour = POLICIES[1 - POLICIES.index(target)]
    own, log = load(root, target, campaign), load(root, behaviour, campaign)
    n_items = int(max(own["item_id"].max(), log["item_id"].max())) + 1
    policy = target_distribution(own, target, n_items)  # (positions, items)
    positions = log["position"].to_numpy() - 1
    items = log["item_id"].to_numpy()
    reward = log["click"].to_numpy(float)
    e = policy[positions, items]
    p = log["propensity_score"].to_numpy(float)

    groups = positions * n_items + items
    q_logged, rates = cross_fitted_rates(groups, reward)
    prior = float(reward.mean())
    q_table = np.array([[rates.get(pos * n_items + i, prior) for i in range(n_items)] for pos in range(3)])
    q_target = (policy * q_table).sum(axis=1)[positions]  # (n,) expected reward of the target at that position

    clicks = int(own["click"].sum())
    rate = wilson(clicks, len(own)).value
    observed = Estimate(rate, float(np.sqrt(rate * (1 - rate) / len(own))), len(own))
    return OpeCheck(
        target, behaviour, len(log), observed, ips(reward, p, e), snips(reward, p, e),
        doubly_robust(reward, p, e, q_logged, q_target),
    )  # fmt: skip


def target_distribution(own_log: pd.DataFrame, policy: str, n_items: int) -> np.ndarray:
    """(3, n_items): the target policy's probability of each item at each position (see the module doc)."""
    if policy == "random":
        return np.full((3, n_items), 1.0 / n_items)
    counts = np.zeros((3, n_items))
    np.add.at(counts, (own_log["position"].to_numpy() - 1, own_log["item_id"].to_numpy()), 1.0)
    return counts / counts.sum(axis=1, keepdims=True)
