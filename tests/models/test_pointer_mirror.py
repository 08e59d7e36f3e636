"""The promoted pointer mirrored in Redis: a registry on another folder (another machine's copy of the
artifacts) follows promotions, rollbacks and reloads through Redis; without Redis the folder still rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from adloop.runs.isolated import with_db
from adloop.settings import Settings
from models.pointer_mirror import KEY, merged
from models.registry import Registry
from tests.support.serving import free_port
from tests.support.stack import TEST_REDIS_DB
from tests.support.trained import registry_with


def test_the_later_promotion_wins_and_the_folder_is_the_fallback() -> None:
    folder = {"version": "v0002", "promoted_at": 20.0, "generation": 1}
    assert merged(None, folder) == folder
    assert merged({"version": "v0003", "promoted_at": 30.0, "generation": 0}, folder) == {
        "version": "v0003", "promoted_at": 30.0, "generation": 1}  # fmt: skip
    assert merged({"version": "v0001", "promoted_at": 10.0, "generation": 4}, folder)["version"] == "v0002"
    assert merged({"version": None, "promoted_at": None, "generation": 4}, folder)["generation"] == 4
    assert merged({"version": "v0001", "promoted_at": 10.0, "generation": 0}, {"generation": 0})["version"] == "v0001"


@pytest.mark.integration
def test_a_replica_on_its_own_folder_follows_through_redis(local_stack: Settings, tmp_path: Path) -> None:
    settings = local_stack.model_copy(update={"redis_url": with_db(local_stack.redis_url, TEST_REDIS_DB),
                                              "model_registry_path": tmp_path / "a"})  # fmt: skip
    admin = redis.Redis.from_url(settings.redis_url)
    admin.delete(KEY)
    registry_with(tmp_path / "a", 2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the replica's copy of the artifacts, no pointer yet
    main = Registry.from_settings(settings)
    replica = Registry.from_settings(settings.model_copy(update={"model_registry_path": tmp_path / "b"}))
    try:
        main.promote("v0001")
        main.promote("v0002")
        assert admin.hget(KEY, "version") == b"v0002"
        assert replica.pointer()["version"] == "v0002" and replica.promoted() is None  # its folder says nothing
        assert main.rollback() == "v0001" and replica.pointer()["version"] == "v0001"
        generation = main.request_reload()
        assert replica.pointer()["generation"] == generation
    finally:
        admin.delete(KEY)

    # Redis unreachable: promotion still works (logged), and the folder is read
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    offline = Registry.from_settings(down)
    offline.promote("v0002")
    assert offline.pointer()["version"] == "v0002"
