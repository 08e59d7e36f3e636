"""`adloop models export VERSION --format onnx`: onnxruntime on the exported files gives torch's user vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adloop import cli
from adloop.settings import get_settings
from models.edge import EdgeScorer
from models.export import FILES, export_onnx
from models.registry import Registry
from models.train import TrainConfig, train
from models.two_tower import TwoTowerConfig, encode_users, to_tensors


@pytest.fixture(scope="module")
def bundle(synthetic_frame):
    tower = TwoTowerConfig(item_buckets=1024, attribute_buckets=128, category_buckets=32, epochs=1, batch_size=64)
    return train(synthetic_frame, TrainConfig(seed=3, tower=tower, num_boost_round=20))[0]


def torch_vectors(bundle, users) -> np.ndarray:
    with torch.inference_mode():
        return bundle.tower.user_tower(
            to_tensors(encode_users(users, bundle.tower.config), torch.device("cpu"))
        ).numpy()


def test_onnxruntime_equals_torch(bundle, synthetic_frame, tmp_path) -> None:
    manifest = export_onnx(bundle, tmp_path / "edge")
    assert sorted(p.name for p in (tmp_path / "edge").iterdir()) == sorted(FILES)
    users = synthetic_frame.drop_duplicates("request_id").head(20).to_dict("records")
    users += [{}, {"recent_items": ["never-seen"]}, {"recent_categories": ["c1"] * 30, "page_view_24h": None}]
    scorer = EdgeScorer(tmp_path / "edge")
    got = scorer.user_vectors(users)
    assert got.shape == (len(users), manifest["dim"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_vectors(bundle, users), atol=1e-5, rtol=0)
    for user in users[:3]:  # one user at a time (the device's case) too
        np.testing.assert_allclose(scorer.user_vectors([user])[0], bundle.user_vector(user), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(scorer.ad_vectors, bundle.ad_matrix)
    assert scorer.ad_ids == list(bundle.ad_ids)
    best = scorer.top_ads(users[0], k=5)
    top, scores = bundle.nearest(bundle.user_vector(users[0]), 5)
    assert [a for a, _ in best] == [bundle.ad_ids[i] for i in top]
    np.testing.assert_allclose([s for _, s in best], scores, atol=1e-5)


def test_export_refuses_a_folder_in_use(bundle, tmp_path) -> None:
    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx(bundle, tmp_path / "edge")


def test_cli_exports_a_registry_version_and_the_script_runs_alone(bundle, synthetic_frame, tmp_path, monkeypatch):
    monkeypatch.setenv("ADLOOP_MODEL_REGISTRY_PATH", str(tmp_path / "models"))
    get_settings.cache_clear()
    try:
        version = Registry(tmp_path / "models").save(bundle, report={})
        out = tmp_path / "out"
        runner = CliRunner()
        result = runner.invoke(cli.app, ["models", "export", version, "--format", "onnx", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["version"] == version
        bad = runner.invoke(cli.app, ["models", "export", version, "--format", "tflite", "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and "only onnx" in bad.output
        missing = runner.invoke(cli.app, ["models", "export", "v9999", "--out", str(tmp_path / "y")])
        assert missing.exit_code == 1 and "not exported" in missing.output
    finally:
        get_settings.cache_clear()
    user = synthetic_frame.iloc[0].to_dict()
    row = {k: user[k] for k in ("recent_items", "recent_categories", "page_view_24h")}
    row["recent_items"], row["recent_categories"] = list(row["recent_items"]), list(row["recent_categories"])
    # The copied script in a bare interpreter run, from outside the project: it imports nothing of adloop.
    done = subprocess.run([sys.executable, "-I", str(out / "score_user.py"), str(out), json.dumps(row)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    top, _ = bundle.nearest(bundle.user_vector(row), 10)
    assert [ln.split("\t")[0] for ln in lines] == [bundle.ad_ids[i] for i in top]
