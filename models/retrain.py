"""Train a version on what serving logged: labelled impressions + point-in-time Feast features.

The closed loop's learning step (`adloop train --from-log`, the demo's retrain, `adloop learn`): the last
`holdout_share` of requests in time is held out and its metrics go into the manifest; `promote` goes
through the promotion gate (models/gate.py), whose unseen traffic is that holdout and anything later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adloop.settings import Settings
from models.dataset import labelled_impressions, training_frame
from models.evaluate import evaluate_bundle
from models.gate import GateRefused, promote_through_gate
from models.registry import Registry
from models.train import TrainConfig, sort_requests, train
from models.two_tower import TwoTowerConfig
from streaming.events import Event

MIN_IMPRESSIONS, MIN_CLICKS = 200, 10


def train_from_log(
    settings: Settings,
    events: Iterable[Event],
    *,
    click_window_s: float = 1800.0,
    seed: int = 0,
    holdout_share: float = 0.2,
    promote: bool = False,
) -> dict[str, Any]:
    """Train, evaluate on the later requests, save (and optionally promote through the gate); returns what it
    did (`promoted`, and `gate`: the comparison when promotion was asked)."""
    events = list(events)  # read twice: the training set, then the gate's replay
    impressions = labelled_impressions(events, click_window_s=click_window_s)
    clicks = int(impressions["label"].sum()) if len(impressions) else 0
    if len(impressions) < MIN_IMPRESSIONS or clicks < MIN_CLICKS:
        raise ValueError(
            f"the log holds {len(impressions)} impressions and {clicks} clicks; training needs at least "
            f"{MIN_IMPRESSIONS} and {MIN_CLICKS} (serve more traffic first)"
        )
    frame = sort_requests(training_frame(settings, impressions))
    requests = frame["request_id"].drop_duplicates()
    cut = set(requests.iloc[int(len(requests) * (1 - holdout_share)) :])
    later = frame["request_id"].isin(cut)
    config = TrainConfig(seed=seed, tower=TwoTowerConfig(seed=seed))
    bundle, report = train(frame[~later].reset_index(drop=True), config)
    holdout = evaluate_bundle(bundle, frame[later].reset_index(drop=True))
    registry = Registry.from_settings(settings)
    metrics = {"holdout": holdout["metrics"], "reliability": holdout["reliability"],
               "impressions": len(impressions), "clicks": clicks, "source": "served log"}  # fmt: skip
    version = registry.save(bundle, report=report, metrics=metrics)
    done: dict[str, Any] = {"version": version, "promoted": False, **metrics}
    if promote:
        try:
            done["gate"] = promote_through_gate(settings, registry, version, events, click_window_s=click_window_s)
            done["promoted"] = True
        except GateRefused as refused:
            done["gate"] = refused.gate
    return done
