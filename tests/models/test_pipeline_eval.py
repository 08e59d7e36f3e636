"""`adloop evaluate PATH --model V --pipeline`: a saved model scored through Kafka, the consumer and Redis
gives exactly the in-process prequential scores (real Kafka, Redis and Feast)."""

from __future__ import annotations

import numpy as np
import pytest

from adloop.runs.pipeline_eval import score_through_pipeline
from adloop.settings import Settings
from models.evaluate import holdout_split, load_mind, score_frame
from models.train import TrainConfig, sort_requests, train
from models.two_tower import TwoTowerConfig
from tests.support.stack import shared_data

pytestmark = pytest.mark.integration


def test_scores_through_the_pipeline_equal_the_in_process_replay(local_stack: Settings, tmp_path) -> None:
    source = shared_data("mind")
    lines = (source / "behaviors.tsv").read_text().splitlines(keepends=True)[:400]  # 5 days, ~80 requests last
    (tmp_path / "behaviors.tsv").write_text("".join(lines))
    (tmp_path / "news.tsv").symlink_to(source / "news.tsv")
    history, holdout = holdout_split(load_mind(tmp_path))
    bundle, _ = train(history, TrainConfig(seed=0, tower=TwoTowerConfig(epochs=1), num_boost_round=60))
    holdout = sort_requests(holdout)
    _, expected = score_frame(bundle, holdout)

    rows = score_through_pipeline(local_stack, tmp_path / "behaviors.tsv", bundle)

    assert len(rows) == len(holdout)
    got = rows.set_index(["request_id", "ad_id"])
    keys = list(zip("mind-" + holdout["request_id"].astype(str), holdout["ad_id"], strict=True))
    np.testing.assert_allclose(got.loc[keys, "prob"].to_numpy(), expected, rtol=1e-9, atol=1e-12)
    assert got.loc[keys, "label"].tolist() == holdout["label"].tolist()
