"""Serving processes follow the registry's promoted version (real trained models, a real registry on disk):
promotion, rollback, a version that fails to load, an admin reload reaching every process, and a
feature reader that is retried until it can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adloop.settings import Settings
from features import store
from serving import metrics
from serving.catalog import generate_catalog, write_catalog
from serving.runtime import Runtime
from tests.support.serving import MemoryReader, NoKafka
from tests.support.trained import registry_with

SLOTS = [{"slot_id": "feed", "format": "native", "count": 2}]


def _settings(catalog_file: Path, **overrides) -> Settings:
    values = {"catalog_path": catalog_file, "catalog_poll_s": 0, "ad_stats_refresh_s": 3600, "model_poll_s": 0,
              "events_topic": "adloop.test.unused", "pacing_sync_s": 0, **overrides}  # fmt: skip
    return Settings(**values)


def _runtime(settings: Settings, registry) -> Runtime:
    return Runtime(settings, feature_reader=MemoryReader(), registry=registry, producer_factory=NoKafka())


def _failures() -> float:
    return metrics.MODEL_LOAD_FAILURES._value.get()


def test_promotion_and_rollback_are_followed_without_a_call(tmp_path, catalog_file) -> None:
    registry = registry_with(tmp_path / "models", 2)
    registry.promote("v0001")
    runtime = _runtime(_settings(catalog_file), registry)
    assert runtime.state.model_version == "v0001"
    assert runtime.follow_once() is False  # nothing changed
    registry.promote("v0002")
    assert runtime.follow_once() is True and runtime.state.model_version == "v0002"
    ready = runtime.readiness()
    assert ready["model_version"] == "v0002" and ready["checks"]["model"]["ok"] and "model" not in ready["degraded"]
    registry.rollback()
    assert runtime.follow_once() is True and runtime.state.model_version == "v0001"
    runtime.stop()


def test_a_version_that_fails_to_load_changes_nothing_and_is_reported(tmp_path, catalog_file) -> None:
    registry = registry_with(tmp_path / "models", 2)
    registry.promote("v0001")
    runtime = _runtime(_settings(catalog_file), registry)
    registry.promote("v0002")  # validated at promotion, then damaged on disk before serving loads it
    with open(registry.root / "v0002" / "ranker.txt", "ab") as file:
        file.write(b"garbage")
    before = _failures()
    assert runtime.follow_once() is False
    assert runtime.state.model_version == "v0001"  # the old model keeps serving
    assert _failures() == before + 1
    ready = runtime.readiness()
    model = ready["checks"]["model"]
    assert model["ok"] is False and model["failed"]["version"] == "v0002" and "corrupt" in model["failed"]["reason"]
    assert "v0002 failed to load" in ready["degraded"]["model"] and ready["ready"] is not None
    listed = {row["version"]: row for row in registry.list()}
    assert "corrupt" in listed["v0002"]["load_failure"]["reason"] and listed["v0001"]["load_failure"] is None
    assert runtime.follow_once() is False and _failures() == before + 1  # not retried on every poll
    registry.rollback()  # back to the version serving: the failure is history
    assert runtime.follow_once() is False and runtime.readiness()["checks"]["model"]["ok"]
    runtime.stop()


def test_a_failed_model_reload_keeps_the_model_serving(tmp_path, catalog_file) -> None:
    registry = registry_with(tmp_path / "models", 1)
    registry.promote("v0001")
    runtime = _runtime(_settings(catalog_file), registry)
    registry._write_pointer({"version": "v0009", "history": ["v0001"], "promoted_at": 0})  # no such version
    described = runtime.reload()
    assert described["model_version"] == "v0001" and described["model_failed"]["version"] == "v0009"
    assert "no manifest" in runtime.readiness()["checks"]["model"]["failed"]["reason"]
    runtime.stop()


def test_an_admin_reload_reaches_every_process_of_the_registry(tmp_path, catalog_file) -> None:
    registry = registry_with(tmp_path / "models", 1)
    registry.promote("v0001")
    settings = _settings(catalog_file, admin_token="secret")
    one, other = _runtime(settings, registry), _runtime(settings, registry)
    write_catalog(generate_catalog(120, seed=5), catalog_file)
    one.reload(everywhere=True)
    assert len(one.state.catalog) == 120 and len(other.state.catalog) == 300
    assert one.follow_once() is False  # its own request is not done twice
    assert other.follow_once() is True and len(other.state.catalog) == 120
    one.stop()
    other.stop()


def test_the_first_promotion_is_picked_up_by_a_process_serving_without_a_model(tmp_path, catalog_file) -> None:
    registry = registry_with(tmp_path / "models", 1)
    runtime = _runtime(_settings(catalog_file), registry)
    assert runtime.state.model is None and "no model" in runtime.readiness()["degraded"]["model"]
    registry.promote("v0001")
    assert runtime.follow_once() is True and runtime.state.model_version == "v0001"
    runtime.stop()


@pytest.mark.integration
def test_a_missing_feature_reader_is_flagged_and_retried(local_stack: Settings, tmp_path, catalog_file) -> None:
    settings = _settings(catalog_file, feast_data_dir=tmp_path / "feast", redis_url=local_stack.redis_url,
                         model_registry_path=tmp_path / "models")  # fmt: skip
    from serving.app import create_app

    app = create_app(settings, producer_factory=NoKafka())
    with TestClient(app) as client:
        body = client.post("/v1/select", json={"user_id": "u-1", "slots": SLOTS}).json()
        ready = client.get("/readyz").json()
        assert body["fallback"] is True and body["fallback_reason"] == "no_feature_store" and body["slots"][0]["ads"]
        assert ready["checks"]["features"]["ok"] is False and "no Feast registry" in ready["degraded"]["features"]
        store.apply(settings)
        runtime = app.state.runtime
        runtime.follow_once()
        body = client.post("/v1/select", json={"user_id": "u-1", "slots": SLOTS}).json()
        ready = client.get("/readyz").json()
    assert body["fallback_reason"] != "no_feature_store"
    assert ready["checks"]["features"]["ok"] is True and "features" not in ready["degraded"]
