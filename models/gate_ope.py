"""The gate's off-policy estimate of a version's click rate from the logged propensities.

The served log holds the shown ads of each request with the probability the serving policy gave each
pick (`propensity`), not the request's whole candidate set. So the target policy is the serving
policy (epsilon-greedy) re-ranking *the shown ads*: for the impression at rank j of a request, its
remaining set R_j is the request's shown ads at rank j or later (the serving policy picks ranks in
order and shows an ad once per request), and

    pi_V(a_j | R_j) = (1 - eps) * [a_j = argmax over R_j of V's pCTR] + eps / |R_j|

with eps the serving epsilon (`serve_epsilon`). V ranks by pCTR alone: the bids are not in the log,
and the quantity estimated is the click rate. With w = pi_V / propensity, SNIPS
(`models.estimators.snips`) gives V's click rate; the promoted version is scored the same way on
the same rows, so the two are paired.

Bias, stated plainly: pi_V is normalised over the shown ads, not over the candidates the serving
policy chose from. When every candidate of a request was shown, R_j is the true remaining candidate
set, pi_V is V's true serving probability and IPS is unbiased (given true, positive propensities,
which epsilon > 0 guarantees) for V's pick at each rank given what the serving policy showed at the
earlier ranks (at rank 1, V's own pick; `tests/models/test_gate_ope.py` checks that case on a simulated
log); SNIPS then has only its O(1/n) self-normalisation bias. When fewer
ads were shown than were eligible, an ad V prefers but the serving policy never showed cannot be
credited: both estimates lean towards the logging policy's choices and their difference shrinks,
so this part of the rule errs towards accepting. It also assumes an ad's click does not depend on
its rank or its neighbours (no position effects).

The rule's part: refuse when V's SNIPS CTR is below the promoted version's by more than `z` standard
errors of the paired difference (delta method, requests as clusters). Rows without a propensity
(older logs, synthetic events) are left out and counted; with too few rows or clicks there is no
evidence and the estimate does not decide.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from models.estimators import snips, wilson


def slate_target_probs(requests: np.ndarray, positions: np.ndarray, scores: np.ndarray, epsilon: float) -> np.ndarray:
    """pi_V(a_j | R_j) per row (see the module doc); rows of a request need not be contiguous."""
    requests, positions = np.asarray(requests), np.asarray(positions, float)
    scores = np.asarray(scores, float)
    out = np.empty(len(scores))
    for rows in pd.Series(np.arange(len(scores))).groupby(requests, sort=False).indices.values():
        pos, sc = positions[rows], scores[rows]
        for k, row in enumerate(rows):
            remaining = pos >= pos[k]  # R_j: this rank and the later ones
            best = int(np.argmax(np.where(remaining, sc, -np.inf)))
            out[row] = (1.0 - epsilon) * (best == k) + epsilon / int(remaining.sum())
    return out


def off_policy(
    frame: pd.DataFrame,
    probs: dict[str, np.ndarray],
    candidate: str,
    incumbent: str,
    *,
    epsilon: float,
    z: float,
    min_rows: int,
    min_clicks: int,
) -> dict[str, Any]:
    """The off-policy part of the gate: per version SNIPS CTR with a 95% interval, the logging policy's
    observed CTR on the same rows, the paired difference and whether it says "worse"."""
    logged = frame["propensity"] if "propensity" in frame else pd.Series(np.nan, index=frame.index)
    propensity = pd.to_numeric(logged, errors="coerce").to_numpy(float)
    usable = np.isfinite(propensity) & (propensity > 0)
    labels = frame["label"].to_numpy(float)[usable]
    out: dict[str, Any] = {"estimator": "snips-on-shown-slate", "epsilon": epsilon, "rows": int(usable.sum()),
                           "rows_without_propensity": int((~usable).sum()), "clicks": int(labels.sum())}  # fmt: skip
    if out["rows"] < min_rows or out["clicks"] < min_clicks:
        out["decision"] = "no evidence"
        out["reason"] = (f"{out['rows']} rows with a propensity and {out['clicks']} clicks "
                         f"(the estimate judges from {min_rows} and {min_clicks})")  # fmt: skip
        return out
    requests = frame["request_id"].to_numpy()[usable]
    positions = frame["position"].to_numpy(float)[usable]
    behaviour = propensity[usable]
    table, terms = {}, {}
    for version in (candidate, incumbent):
        target = slate_target_probs(requests, positions, probs[version][usable], epsilon)
        estimate = snips(labels, behaviour, target)
        interval = estimate.interval()
        table[version] = {"snips_ctr": estimate.value, "low": interval.low, "high": interval.high, "se": estimate.se}
        w = target / behaviour
        terms[version] = w * (labels - estimate.value) / w.mean()  # SNIPS's delta-method linearisation
    observed = wilson(int(labels.sum()), len(labels))
    table["logged policy"] = {"snips_ctr": observed.value, "low": observed.low, "high": observed.high}
    difference = table[candidate]["snips_ctr"] - table[incumbent]["snips_ctr"]
    se = cluster_se(terms[candidate] - terms[incumbent], requests)
    worse = bool(np.isfinite(se) and difference < -z * se)
    return {**out, "table": table, "difference": {"difference": difference, "se": se},
            "decision": "worse" if worse else "not worse"}  # fmt: skip


def cluster_se(values: np.ndarray, clusters: np.ndarray) -> float:
    """Standard error of the mean of `values` with `clusters` as the independent units (CR1 sandwich)."""
    values = np.asarray(values, float)
    frame = pd.DataFrame({"v": values - values.mean(), "c": clusters})
    sums = frame.groupby("c")["v"].sum().to_numpy()
    g = sums.size
    if g < 2:
        return math.nan
    return float(np.sqrt(g / (g - 1) * (sums**2).sum()) / values.size)
