"""Targeting power of a model trained on a small explored log, measured against the simulator's truth.

    .venv/bin/python -m bench.targeting [--requests 600] [--seeds 10] [--users 200]

(Every bench runs as a module from the project root: `python -m bench.<name>`.)

The demo's first phase, in process and without services: the SYNTHETIC population browses (the
consumer's own `features.aggregates` build the user rows), then `--requests` requests are served two
ads drawn uniformly from the demo catalog (exploration), clicked by the users' hidden preferences.
A model is trained on the first 80% of requests exactly as `models.retrain` does (`models.train.train`).
Then, for every user (weighted by activity), the model's top-2 ads by pCTR x bid get the expected
click rate the simulator assigns them. Printed per seed and summarised: model, uniform serving
(control), the oracle's top-2, and the model's lift over uniform. Ad performance features stay at an
untouched ad's values (the log is too small for them to matter).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adloop.runs import demo
from features.aggregates import UserState, apply_user, user_features
from models.train import TrainConfig, train
from models.two_tower import TwoTowerConfig
from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.simulate import Population


def explored_log(population: Population, catalog: pd.DataFrame, n_requests: int, seed: int):
    """(training frame, final user states): browsing, then uniformly explored requests and their clicks."""
    states: dict[str, UserState] = {}
    browsing = demo.DemoConfig().browsing_events * len(population.users)
    for event in population.events(browsing):
        apply_user(states.setdefault(event.user_id, UserState()), event)
    rng = np.random.default_rng([seed, 9])
    weights = np.array([u.activity for u in population.users])
    now = datetime.now(UTC)  # the demo's browsing ends a minute before now; its traffic follows
    rows = []
    for r in range(n_requests):
        now += timedelta(milliseconds=50)
        user = population.users[int(rng.choice(len(population.users), p=weights / weights.sum()))]
        state = states.setdefault(user.user_id, UserState())
        features = user_features(state)  # as of just before the request
        shown = [catalog.iloc[int(i)] for i in rng.choice(len(catalog), size=2, replace=False)]
        impressions = [_impression(f"r{r}", user, ad, position, now) for position, ad in enumerate(shown, 1)]
        for ad, impression in zip(shown, impressions, strict=True):
            rows.append({
                "request_id": f"r{r}", "user_id": user.user_id, "ad_id": ad.ad_id, "campaign_id": ad.campaign_id,
                "category": ad.category, "advertiser_id": ad.advertiser_id, "position": impression.position,
                "device": user.device, "ts": impression.ts_ms, "slate_size": 2,
                "hour": (impression.ts_ms // 3_600_000) % 24,
                "label": int(population.click_event(impression) is not None), **features,
            })  # fmt: skip
            apply_user(state, impression)
    return pd.DataFrame(rows), states


def _impression(request_id: str, user, ad, position: int, ts: datetime) -> Event:
    return Event(
        event_id=f"{request_id}-{ad.ad_id}",
        schema_version=SCHEMA_VERSION,
        event_type=EventType.ad_impression,
        user_id=user.user_id,
        ts=ts,
        ad_id=ad.ad_id,
        campaign_id=ad.campaign_id,
        category=ad.category,
        request_id=request_id,
        position=position,
        context={"device": user.device},
    )


def expected_ctr(bundle, population: Population, catalog: pd.DataFrame, states) -> tuple[float, float, float]:
    """Activity-weighted true click rate of (model's top-2 by pCTR x bid, uniform, oracle's top-2)."""
    ads = {c: catalog[c].to_numpy(object) for c in ("ad_id", "category", "campaign_id")}
    bid = catalog["bid"].to_numpy(float)
    weights = np.array([u.activity for u in population.users])
    model, uniform, oracle = [], [], []
    for user in population.users:
        truth = np.array([population.click_probability(user.user_id, c) for c in catalog["category"]])
        features = user_features(states.get(user.user_id, UserState()))
        scores = bundle.ad_matrix @ bundle.user_vector(features)
        context = {"ts_ms": time.time() * 1000, "device": user.device, "slate_size": 2}
        pctr = bundle.predict_ctr(features, ads, context, scores)
        model.append(truth[np.argsort(-pctr * bid)[:2]].mean())
        uniform.append(truth.mean())
        oracle.append(truth[np.argsort(-truth * bid)[:2]].mean())
    return tuple(float(np.average(v, weights=weights)) for v in (model, uniform, oracle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="explored requests before training")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lifts = []
    print(f"{'seed':>4} {'clicks':>6} {'trees':>5} {'model':>7} {'uniform':>7} {'oracle':>7} {'lift':>7}")
    with tempfile.TemporaryDirectory() as work:
        for seed in range(7, 7 + args.seeds):
            config = demo.DemoConfig(users=args.users, seed=seed)
            population = Population(demo._sim_config(config))
            demo.write_demo_catalog(Path(work) / "ads.csv", n_ads=config.ads, seed=seed)
            catalog = pd.read_csv(Path(work) / "ads.csv")
            frame, states = explored_log(population, catalog, args.requests, seed)
            train_rows = frame.iloc[: int(len(frame) * 0.8)].reset_index(drop=True)  # as retrain's holdout
            bundle, _ = train(train_rows, TrainConfig(seed=0, tower=TwoTowerConfig(seed=0)))
            bundle.set_catalog(catalog)
            model, uniform, oracle = expected_ctr(bundle, population, catalog, states)
            lifts.append(model / uniform - 1)
            print(f"{seed:>4} {int(frame['label'].sum()):>6} {bundle.booster.num_trees():>5} {model:>7.4f} "
                  f"{uniform:>7.4f} {oracle:>7.4f} {lifts[-1]:>+7.0%}")  # fmt: skip
    print(f"\n{args.requests} explored requests, {args.seeds} seeds ({datetime.now(UTC):%Y-%m-%d}): lift of the "
          f"model's top-2 over uniform, median {statistics.median(lifts):+.0%}, worst {min(lifts):+.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
