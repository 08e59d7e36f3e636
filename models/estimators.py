"""Statistics of outcomes: lift of targeting over control, and off-policy estimates of a policy's click rate.

Lift (two independent binomial samples, clicks out of impressions):
- CTR per arm with a Wilson score interval;
- difference targeted - control with Newcombe's hybrid score interval (Newcombe 1998, method 10,
  built from the two Wilson intervals; better coverage than Wald at CTRs of a few percent);
- relative lift = CTR_t / CTR_c - 1 with the delta-method (Katz) interval on log(CTR_t / CTR_c):
  SE = sqrt(1/x_t - 1/n_t + 1/x_c - 1/n_c).
Impressions of one user are not independent (the arm is drawn per user): with few users and many
impressions each, the binomial intervals are too narrow. Given per-user counts, `lift(..., users=)`
adds intervals with the user as the unit: CTR_a = sum(y) / sum(n) over the arm's m users is a ratio
estimator with Var = sum((y_u - CTR_a n_u)^2) / (m (m - 1) mean(n)^2) (delta method, cluster-robust);
the arms hold different users, so the variances add (difference) or add on the log scale (relative).

Off-policy evaluation of a target policy e from logs of a behaviour policy b, per logged row i with
reward r_i, behaviour propensity p_i = b(a_i | x_i) and target probability e_i = e(a_i | x_i),
weight w_i = e_i / p_i:
- IPS     V = mean(w r)                                   SE = sd(w r) / sqrt(n)
- SNIPS   V = sum(w r) / sum(w)                           SE by the delta method: sd(w (r - V)) / mean(w) / sqrt(n)
- DR      V = mean(q_e + w (r - q_a))                     SE = sd(those terms) / sqrt(n)
  where q_a = q(x_i, a_i) is a reward model at the logged action and q_e = sum_a e(a | x_i) q(x_i, a)
  its expectation under the target policy (Dudik, Langford, Li 2011).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


METHODS = {"ctr": "wilson", "difference": "newcombe-hybrid-score", "relative": "delta-method-log-ratio",
           "by_user": "ratio-estimator-delta-method-clustered-by-user"}  # fmt: skip


@dataclass(frozen=True)
class UserClustered:
    """The lift's intervals with users, not impressions, as the independent units."""

    difference: Interval  # CTR_t - CTR_c
    relative: Interval | None  # CTR_t / CTR_c - 1; None without clicks in an arm
    users_targeted: int
    users_control: int

    def as_dict(self) -> dict:
        return {"difference": self.difference.as_dict(),
                "relative": self.relative.as_dict() if self.relative else None,
                "users_targeted": self.users_targeted, "users_control": self.users_control}  # fmt: skip


@dataclass(frozen=True)
class Lift:
    targeted: Interval  # CTR, Wilson
    control: Interval
    difference: Interval  # CTR_t - CTR_c, Newcombe hybrid score
    relative: Interval | None  # CTR_t / CTR_c - 1, delta method on the log ratio; None without clicks in an arm
    confidence: float
    by_user: UserClustered | None = None  # with per-user counts: the same, users as units

    def as_dict(self) -> dict:
        return {
            "targeted": self.targeted.as_dict(),
            "control": self.control.as_dict(),
            "difference": self.difference.as_dict(),
            "relative": self.relative.as_dict() if self.relative else None,
            "by_user": self.by_user.as_dict() if self.by_user else None,
            "confidence": self.confidence,
            "methods": METHODS,
        }


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    n: int

    def interval(self, confidence: float = 0.95) -> Interval:
        z = _z(confidence)
        return Interval(self.value, self.value - z * self.se, self.value + z * self.se)


def wilson(clicks: int, impressions: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion; (nan, 0, 1) with no impressions."""
    if impressions <= 0:
        return Interval(math.nan, 0.0, 1.0)
    z, n = _z(confidence), impressions
    p = clicks / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


PerUser = tuple[np.ndarray, np.ndarray]  # (impressions, clicks) per user of one arm


def lift(
    clicks_t: int,
    impressions_t: int,
    clicks_c: int,
    impressions_c: int,
    confidence: float = 0.95,
    *,
    users: tuple[PerUser, PerUser] | None = None,
) -> Lift:
    """Targeted (t) over control (c): CTRs, their difference and the relative lift, each with an interval;
    `users` ((targeted), (control) per-user counts) adds the user-clustered intervals."""
    t, c = wilson(clicks_t, impressions_t, confidence), wilson(clicks_c, impressions_c, confidence)
    if impressions_t == 0 or impressions_c == 0:
        nan = Interval(math.nan, math.nan, math.nan)
        return Lift(t, c, nan, None, confidence)
    by_user = clustered(*users, confidence) if users is not None else None
    diff = t.value - c.value
    low = diff - math.sqrt((t.value - t.low) ** 2 + (c.high - c.value) ** 2)
    high = diff + math.sqrt((t.high - t.value) ** 2 + (c.value - c.low) ** 2)
    relative = None
    if clicks_t > 0 and clicks_c > 0:
        log_ratio = math.log(t.value / c.value)
        se = math.sqrt(1 / clicks_t - 1 / impressions_t + 1 / clicks_c - 1 / impressions_c)
        z = _z(confidence)
        relative = Interval(math.exp(log_ratio) - 1, math.exp(log_ratio - z * se) - 1, math.exp(log_ratio + z * se) - 1)
    return Lift(t, c, Interval(diff, low, high), relative, confidence, by_user)


def clustered(targeted: PerUser, control: PerUser, confidence: float = 0.95) -> UserClustered | None:
    """Difference and relative lift of the arms' CTRs with users as the units (see the module docstring);
    None unless each arm has at least two users with impressions."""
    (rate_t, var_t, m_t), (rate_c, var_c, m_c) = _ratio(*targeted), _ratio(*control)
    if min(m_t, m_c) < 2:
        return None
    z, diff = _z(confidence), rate_t - rate_c
    half = z * math.sqrt(var_t + var_c)
    relative = None
    if rate_t > 0 and rate_c > 0:
        log_ratio, se = math.log(rate_t / rate_c), math.sqrt(var_t / rate_t**2 + var_c / rate_c**2)
        relative = Interval(math.exp(log_ratio) - 1, math.exp(log_ratio - z * se) - 1, math.exp(log_ratio + z * se) - 1)
    return UserClustered(Interval(diff, diff - half, diff + half), relative, m_t, m_c)


def _ratio(impressions: np.ndarray, clicks: np.ndarray) -> tuple[float, float, int]:
    """(sum(clicks) / sum(impressions), its cluster-robust variance, users) over users with impressions."""
    n, y = np.asarray(impressions, float), np.asarray(clicks, float)
    n, y = n[n > 0], y[n > 0]
    m = len(n)
    if m < 2:
        return math.nan, math.nan, m
    rate = float(y.sum() / n.sum())
    variance = float(((y - rate * n) ** 2).sum() / (m * (m - 1) * n.mean() ** 2))
    return rate, variance, m


def ips(reward: np.ndarray, behaviour: np.ndarray, target: np.ndarray) -> Estimate:
    """Inverse propensity scoring; arrays (n,): reward, behaviour propensity and target probability of the
    logged action."""
    terms = _weights(behaviour, target) * np.asarray(reward, float)
    return Estimate(float(terms.mean()), _se(terms), len(terms))


def snips(reward: np.ndarray, behaviour: np.ndarray, target: np.ndarray) -> Estimate:
    """Self-normalised IPS: the weighted mean of rewards (biased, much lower variance than IPS)."""
    w, r = _weights(behaviour, target), np.asarray(reward, float)
    value = float((w * r).sum() / w.sum())
    return Estimate(value, _se(w * (r - value)) / float(w.mean()), len(r))


def doubly_robust(
    reward: np.ndarray, behaviour: np.ndarray, target: np.ndarray, q_logged: np.ndarray, q_target: np.ndarray
) -> Estimate:
    """DR: `q_logged` (n,) the reward model at the logged action, `q_target` (n,) its expectation under the
    target policy in each logged context."""
    w = _weights(behaviour, target)
    terms = np.asarray(q_target, float) + w * (np.asarray(reward, float) - np.asarray(q_logged, float))
    return Estimate(float(terms.mean()), _se(terms), len(terms))


def cross_fitted_rates(
    groups: np.ndarray, reward: np.ndarray, *, folds: int = 2, prior_weight: float = 20.0, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """A per-group click-rate reward model, cross-fitted: each row's rate comes from the other folds
    (so DR's correction term is not fitted on its own row), smoothed towards the overall rate with
    `prior_weight` pseudo-impressions. Returns ((n,) rates at the rows, {group: rate on all rows})."""
    groups, reward = np.asarray(groups), np.asarray(reward, float)
    fold = np.random.default_rng(seed).integers(folds, size=len(reward))
    out = np.empty(len(reward))
    for k in range(folds):
        train = fold != k
        rates = _rates(groups[train], reward[train], prior_weight)
        prior = reward[train].mean()
        out[~train] = [rates.get(g, prior) for g in groups[~train]]
    return out, _rates(groups, reward, prior_weight)


def _rates(groups: np.ndarray, reward: np.ndarray, prior_weight: float) -> dict:
    prior = float(reward.mean()) if len(reward) else 0.0
    keys, inverse = np.unique(groups, return_inverse=True)
    clicks = np.bincount(inverse, weights=reward, minlength=len(keys))
    shown = np.bincount(inverse, minlength=len(keys))
    return dict(zip(keys.tolist(), ((clicks + prior_weight * prior) / (shown + prior_weight)).tolist(), strict=True))


def _weights(behaviour: np.ndarray, target: np.ndarray) -> np.ndarray:
    behaviour = np.asarray(behaviour, float)
    if np.any(behaviour <= 0):
        raise ValueError("behaviour propensities must be positive (a logged action had probability 0)")
    return np.asarray(target, float) / behaviour


def _se(terms: np.ndarray) -> float:
    return float(terms.std(ddof=1) / math.sqrt(len(terms))) if len(terms) > 1 else math.inf


def _z(confidence: float) -> float:
    return float(norm.ppf(0.5 + confidence / 2))
