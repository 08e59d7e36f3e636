"""The promotion gate: a candidate version against the promoted one, on logged traffic neither trained on.

The traffic: labelled impressions of the served log (a click within the click window) later than the
end of both versions' training data (`data_window.to_ms` in their manifests) and within the last
`hours` of the log, joined with their features as they were at each impression (Feast point-in-time,
`models.dataset.training_frame`). Both versions score every row (prequential: nothing of it was
seen in training), so the comparison is paired:

- logloss: the mean per-impression difference (candidate - promoted), its standard error with the
  request as the cluster (a request's impressions share a user and a moment);
- group AUC: `models.metrics.paired_group_auc` (per request with a click and a non-click);
- an off-policy estimate of each version's click rate from the logged propensities
  (`models.gate_ope`: SNIPS of each version's epsilon-greedy re-ranking of the shown ads, weights
  pi_V / propensity; its bias is stated there: exact when every candidate was shown, leaning towards
  the logging policy otherwise), with the logging policy's observed CTR on the same rows.

The rule: refuse when the candidate is worse beyond noise, i.e. its logloss is higher by more than
`Z` = 2 standard errors, or its group AUC lower by more than 2 standard errors, or its SNIPS click
rate lower by more than 2 standard errors of the paired difference (each requests as clusters). With fewer than
`MIN_IMPRESSIONS` impressions or `MIN_CLICKS` clicks of unseen traffic there is no evidence either way
and the candidate passes ("no evidence"), saying so. With no promoted version the first version that
loads passes.

The decision, with the table, is stored in the candidate's manifest (`gate`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from adloop.settings import Settings
from models.dataset import labelled_impressions, training_frame
from models.evaluate import score_frame
from models.gate_ope import cluster_se, off_policy
from models.metrics import auc, group_metrics, paired_group_auc
from models.registry import Registry
from models.train import sort_requests
from streaming.events import Event

log = logging.getLogger(__name__)

Z = 2.0  # standard errors: "worse beyond noise"
MIN_IMPRESSIONS, MIN_CLICKS = 200, 10


class GateRefused(RuntimeError):
    """The candidate is worse than the promoted version beyond noise; `gate` holds the comparison."""

    def __init__(self, message: str, gate: dict[str, Any]):
        super().__init__(message)
        self.gate = gate


def compare(
    settings: Settings,
    registry: Registry,
    candidate: str,
    events: Iterable[Event],
    *,
    hours: float = 6.0,
    click_window_s: float = 1800.0,
) -> dict[str, Any]:
    """The gate's comparison of `candidate` with the promoted version (see the module doc); raises
    RegistryError when the candidate does not load."""
    bundle = registry.load(candidate, compiled=False)
    incumbent = registry.promoted()
    base = {"candidate": candidate, "promoted": incumbent, "rule": rule_text(), "at": _now()}
    if incumbent is None or incumbent == candidate:
        reason = "no promoted version yet: the first version that loads" if incumbent is None else "already promoted"
        return {**base, "decision": "accept", "reason": reason, "table": {}}
    other = registry.load(incumbent, compiled=False)
    trained_until = max(_trained_until(registry, candidate), _trained_until(registry, incumbent))
    impressions = labelled_impressions(events, click_window_s=click_window_s)
    recent = _unseen(impressions, trained_until, hours)
    clicks = int(recent["label"].sum()) if len(recent) else 0
    base |= {"trained_until_ms": trained_until, "impressions": len(recent), "clicks": clicks, "hours": hours}
    if len(recent) < MIN_IMPRESSIONS or clicks < MIN_CLICKS:
        reason = (f"no evidence: {len(recent)} unseen impressions and {clicks} clicks "
                  f"(the gate judges from {MIN_IMPRESSIONS} and {MIN_CLICKS})")  # fmt: skip
        return {**base, "decision": "accept", "reason": reason, "table": {}}
    frame = sort_requests(training_frame(settings, recent))
    labels = frame["label"].to_numpy()
    probs = {candidate: score_frame(bundle, frame)[1], incumbent: score_frame(other, frame)[1]}
    groups = frame["request_id"].to_numpy()
    table = {v: _row(groups, labels, p) for v, p in probs.items()}
    loss = _logloss_terms(labels, probs[candidate]) - _logloss_terms(labels, probs[incumbent])
    logloss_diff = {"difference": float(loss.mean()), "se": cluster_se(loss, groups)}
    auc_diff = paired_group_auc(groups, labels, probs[candidate], probs[incumbent])
    ope = off_policy(frame, probs, candidate, incumbent, epsilon=settings.serve_epsilon, z=Z,
                     min_rows=MIN_IMPRESSIONS, min_clicks=MIN_CLICKS)  # fmt: skip
    for version, row in ope.get("table", {}).items():  # the table carries the estimate beside the scores
        table[version] = table.get(version, {}) | {"snips_ctr": row["snips_ctr"], "snips_low": row["low"],
                                                   "snips_high": row["high"]}  # fmt: skip
    worse = []
    if logloss_diff["difference"] > Z * logloss_diff["se"]:
        worse.append(f"logloss +{logloss_diff['difference']:.4f} (se {logloss_diff['se']:.4f})")
    if np.isfinite(auc_diff["se"]) and auc_diff["difference"] < -Z * auc_diff["se"]:
        worse.append(f"group AUC {auc_diff['difference']:+.4f} (se {auc_diff['se']:.4f})")
    if ope["decision"] == "worse":
        worse.append(f"SNIPS CTR {ope['difference']['difference']:+.4f} (se {ope['difference']['se']:.4f})")
    reason = ("worse beyond noise: " + "; ".join(worse)) if worse else "not worse beyond noise"
    return {**base, "decision": "refuse" if worse else "accept", "reason": reason, "table": table,
            "paired": {"logloss": logloss_diff, "group_auc": auc_diff}, "off_policy": ope}  # fmt: skip


def promote_through_gate(
    settings: Settings,
    registry: Registry,
    candidate: str,
    events: Iterable[Event],
    *,
    force: bool = False,
    hours: float = 6.0,
    click_window_s: float = 1800.0,
) -> dict[str, Any]:
    """Compare, store the comparison in the candidate's manifest, and promote unless refused (or `force`).
    Raises GateRefused (nothing promoted) or RegistryError."""
    gate = compare(settings, registry, candidate, events, hours=hours, click_window_s=click_window_s)
    gate["forced"] = force and gate["decision"] == "refuse"
    registry.record_gate(candidate, gate)
    if gate["decision"] == "refuse" and not force:
        log.info("gate refused %s against %s: %s", candidate, gate["promoted"], gate["reason"])
        raise GateRefused(f"{candidate} not promoted: {gate['reason']} (against {gate['promoted']})", gate)
    registry.promote(candidate)
    log.info("gate %s %s against %s: %s", "forced" if gate["forced"] else "passed", candidate, gate["promoted"],
             gate["reason"])  # fmt: skip
    return gate


def rule_text() -> str:
    return (f"refuse when the candidate's logloss is higher, or its group AUC or off-policy (SNIPS) click rate "
            f"lower, than the promoted version's by more than {Z:g} standard errors of the paired difference "
            f"(requests as clusters)")  # fmt: skip


def _unseen(impressions: pd.DataFrame, trained_until: int, hours: float) -> pd.DataFrame:
    if impressions.empty:
        return impressions
    newest = int(impressions["ts"].max())  # the log's clock, not the wall clock: a replayed log works the same
    keep = (impressions["ts"] > trained_until) & (impressions["ts"] >= newest - hours * 3_600_000)
    return impressions[keep].reset_index(drop=True)


def _trained_until(registry: Registry, version: str) -> int:
    window = registry.manifest(version).get("data_window") or {}
    return int(window.get("to_ms") or 0)


def _logloss_terms(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=float), eps, 1 - eps)
    return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def _row(groups: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"logloss": float(_logloss_terms(labels, probs).mean()), "auc": auc(labels, probs),
            "group_auc": group_metrics(groups, labels, probs)["group_auc"],
            "mean_pctr": float(np.mean(probs)), "observed_ctr": float(np.mean(labels))}  # fmt: skip


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
