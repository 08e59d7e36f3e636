"""The promotion gate on a real served log (Kafka, the consumer, Feast point-in-time features): a model
trained on shuffled labels is refused against a real one, the reverse is accepted, and the comparison
is stored in the candidate's manifest; `adloop models promote` shows it and honours --force."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from adloop.settings import Settings
from models.dataset import labelled_impressions, training_frame
from models.gate import GateRefused, compare, promote_through_gate
from models.registry import Registry
from models.train import TrainConfig, sort_requests, train
from models.two_tower import TwoTowerConfig
from streaming.topic_reader import read_events
from tests.models.test_retrain import served_log
from tests.support.stack import consume_all, produce

pytestmark = pytest.mark.integration


def test_the_gate_refuses_shuffled_labels_and_accepts_the_real_model(feature_settings: Settings, monkeypatch) -> None:
    events = served_log(1000, seed=4)
    produce(feature_settings, events)
    consume_all(feature_settings, len(events))
    logged = list(read_events(feature_settings))
    frame = sort_requests(training_frame(feature_settings, labelled_impressions(logged)))
    requests = frame["request_id"].drop_duplicates()
    early = frame[frame["request_id"].isin(set(requests.iloc[: int(len(requests) * 0.6)]))].reset_index(drop=True)
    config = TrainConfig(seed=3, tower=TwoTowerConfig(seed=3))
    real, real_report = train(early, config)
    shuffled = early.assign(label=np.random.default_rng(0).permutation(early["label"].to_numpy()))
    noise, noise_report = train(shuffled, config)
    registry = Registry(feature_settings.model_registry_path)
    v_real, v_noise = registry.save(real, report=real_report), registry.save(noise, report=noise_report)

    first = compare(feature_settings, registry, v_noise, logged)
    assert first["decision"] == "accept" and "first version" in first["reason"]
    registry.promote(v_noise)
    better = compare(feature_settings, registry, v_real, logged)
    assert better["decision"] == "accept", better
    assert better["impressions"] >= 1000 and better["paired"]["logloss"]["difference"] < 0
    assert better["table"][v_real]["group_auc"] > better["table"][v_noise]["group_auc"]
    # The off-policy estimate from the logged propensities: the real model's re-ranking clicks more, beyond noise.
    ope = better["off_policy"]
    assert ope["rows"] == better["impressions"] and ope["decision"] == "not worse", ope
    real_ctr, noise_ctr = better["table"][v_real]["snips_ctr"], better["table"][v_noise]["snips_ctr"]
    assert real_ctr - noise_ctr > 2 * ope["difference"]["se"] > 0, ope
    assert better["table"][v_real]["snips_low"] < real_ctr < better["table"][v_real]["snips_high"]

    registry.promote(v_real)
    with pytest.raises(GateRefused, match="worse beyond noise") as refused:
        promote_through_gate(feature_settings, registry, v_noise, logged)
    assert registry.promoted() == v_real
    stored = registry.manifest(v_noise)["gate"]
    assert stored["decision"] == "refuse" and stored["promoted"] == v_real and refused.value.gate == stored
    assert "SNIPS CTR" in stored["reason"] and stored["off_policy"]["decision"] == "worse", stored["reason"]

    from adloop.cli import learn
    from adloop.cli.app import app

    monkeypatch.setattr(learn, "get_settings", lambda: feature_settings)
    runner = CliRunner()
    cli = runner.invoke(app, ["models", "promote", v_noise])
    assert cli.exit_code == 1 and "not promoted" in cli.output and "unseen impressions" in cli.output, cli.output
    assert "SNIPS" in cli.output and "logged" in cli.output, cli.output  # the table's column and reference row
    assert registry.promoted() == v_real
    forced = runner.invoke(app, ["models", "promote", v_noise, "--force"])
    assert forced.exit_code == 0 and "forced past the gate" in forced.output, forced.output
    assert registry.promoted() == v_noise and registry.manifest(v_noise)["gate"]["forced"] is True
    listed = runner.invoke(app, ["models", "list"])
    assert "refuse" in listed.output, listed.output
