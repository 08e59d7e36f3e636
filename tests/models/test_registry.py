"""Registry: versions, atomic promotion, rollback; a bad artifact never replaces the promoted version."""

import json

import numpy as np
import pytest

from models.registry import Registry, RegistryError
from models.train import TrainConfig, train
from models.two_tower import TwoTowerConfig


@pytest.fixture(scope="module")
def bundle_and_report(synthetic_frame):
    tower = TwoTowerConfig(item_buckets=1024, attribute_buckets=128, category_buckets=32, epochs=1, batch_size=64)
    return train(synthetic_frame, TrainConfig(seed=3, tower=tower, num_boost_round=40))


@pytest.fixture
def registry(tmp_path, bundle_and_report):
    bundle, report = bundle_and_report
    reg = Registry(tmp_path / "models")
    for _ in range(2):
        reg.save(bundle, report=report, metrics={"full model": {"group_auc": 0.6}})
    return reg


def test_save_list_promote_rollback(registry):
    assert [row["version"] for row in registry.list()] == ["v0001", "v0002"]
    assert registry.promoted() is None
    registry.promote("v0001")
    registry.promote("v0002")
    assert registry.promoted() == "v0002"
    assert [row["promoted"] for row in registry.list()] == [False, True]
    assert registry.rollback() == "v0001"
    assert registry.promoted() == "v0001"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()


def test_manifest_names_features_with_feast_references(registry):
    manifest = registry.manifest("v0001")
    sources = {f["name"]: f["source"] for f in manifest["features"]}
    assert sources["ad_ctr_7d"] == "ad_performance:ad_ctr_7d"
    assert sources["page_view_24h"] == "user_activity:page_view_24h"
    assert manifest["seed"] == 3 and manifest["data_window"]["from_ms"] < manifest["data_window"]["to_ms"]
    assert set(manifest["artifacts"]) >= {"ranker.txt", "two_tower.pt", "ad_matrix.npy", "calibrator.json"}


def test_loaded_bundle_predicts_like_the_saved_one(registry, bundle_and_report, synthetic_frame):
    from models.evaluate import score_frame

    bundle, _ = bundle_and_report
    loaded = registry.load("v0001", compiled=False)
    rows = synthetic_frame.tail(60)
    np.testing.assert_allclose(score_frame(loaded, rows)[1], score_frame(bundle, rows)[1], rtol=1e-9)
    np.testing.assert_array_equal(loaded.ad_matrix, bundle.ad_matrix)


@pytest.mark.parametrize("artifact", ["ranker.txt", "two_tower.pt", "ad_matrix.npy", "calibrator.json"])
def test_corrupt_artifact_fails_clearly_and_keeps_promoted(registry, artifact):
    registry.promote("v0001")
    with open(registry.root / "v0002" / artifact, "ab") as file:
        file.write(b"garbage")
    with pytest.raises(RegistryError, match=f"v0002.*{artifact}.*corrupt"):
        registry.load("v0002")
    with pytest.raises(RegistryError, match=artifact):
        registry.promote("v0002")
    assert registry.promoted() == "v0001"


def test_missing_artifact_or_manifest_fails_clearly(registry):
    registry.promote("v0001")
    (registry.root / "v0002" / "two_tower.pt").unlink()
    with pytest.raises(RegistryError, match=r"two_tower\.pt is missing"):
        registry.promote("v0002")
    with pytest.raises(RegistryError, match="no manifest"):
        registry.promote("v0009")
    assert registry.promoted() == "v0001"


def test_rollback_target_is_validated_too(registry):
    registry.promote("v0001")
    registry.promote("v0002")
    (registry.root / "v0001" / "ranker.txt").write_text("tree\n")
    with pytest.raises(RegistryError, match=r"ranker\.txt"):
        registry.rollback()
    assert registry.promoted() == "v0002"
    assert json.loads((registry.root / "promoted.json").read_text())["history"] == ["v0001"]


def test_compiled_predictor_equals_lightgbm(registry, synthetic_frame):
    pytest.importorskip("lleaves", reason="lleaves (LLVM-compiled LightGBM) is not installed")
    from models.evaluate import score_frame

    compiled = registry.load("v0001", compiled=True)
    assert compiled.compiled is not None
    plain = registry.load("v0001", compiled=False)
    rows = synthetic_frame.tail(200)
    np.testing.assert_allclose(score_frame(compiled, rows)[1], score_frame(plain, rows)[1], rtol=0, atol=1e-12)


def _load_compiled(root: str) -> bool:
    return Registry(root).load("v0001", compiled=True).compiled is not None


def test_workers_loading_one_version_at_once_share_one_compile(registry):
    """uvicorn workers start together: each gets a working compiled predictor, one cache file, no leftovers."""
    pytest.importorskip("lleaves", reason="lleaves (LLVM-compiled LightGBM) is not installed")
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert pool.map(_load_compiled, [str(registry.root)] * 3) == [True, True, True]
    folder = registry.root / "v0001"
    assert (folder / "ranker.compiled").is_file()
    assert not list(folder.glob("*.partial"))
