"""Real trained versions for serving tests: a small two-tower + LightGBM model on the synthetic world of
tests/models/conftest.py, trained once per test process and saved into registries as often as asked."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from models.registry import Registry


@functools.lru_cache(maxsize=1)
def trained() -> tuple[Any, dict[str, Any]]:
    from models.mind import Replay
    from models.train import TrainConfig, train
    from models.two_tower import TwoTowerConfig
    from tests.support.models import synthetic_world

    news, impressions = synthetic_world(n_requests=300)
    tower = TwoTowerConfig(item_buckets=1024, attribute_buckets=128, category_buckets=32, epochs=1, batch_size=64)
    return train(Replay(news).run(impressions), TrainConfig(seed=3, tower=tower, num_boost_round=20))


def registry_with(root: Path, versions: int) -> Registry:
    """A registry at `root` holding `versions` saved copies of the trained model (v0001, v0002, ...)."""
    bundle, report = trained()
    registry = Registry(root)
    for _ in range(versions):
        registry.save(bundle, report=report, metrics={"full model": {"group_auc": 0.6}})
    return registry
