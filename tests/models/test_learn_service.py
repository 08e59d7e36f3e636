"""`adloop learn` as a service: after traffic it trains a version from the served log (Feast point-in-time
features), promotes it through the gate by itself, and a serving process follows; a check with nothing
new waits, one decision per log line."""

from __future__ import annotations

import logging

import pytest

from adloop.settings import Settings
from models.learn_service import DECISIONS, LearnService
from models.registry import Registry
from serving.catalog import generate_catalog, write_catalog
from serving.runtime import Runtime
from streaming.events import Event
from tests.models.test_retrain import served_log
from tests.support.serving import MemoryReader, NoKafka
from tests.support.stack import consume_all, produce

pytestmark = pytest.mark.integration


def test_learn_trains_from_the_served_log_promotes_and_serving_follows(
    feature_settings: Settings, tmp_path, caplog
) -> None:
    catalog_file = tmp_path / "ads.csv"
    write_catalog(generate_catalog(200, seed=7), catalog_file)
    settings = feature_settings.model_copy(update={"learn_every_impressions": 2000, "learn_every_minutes": 1e6,
                                                   "catalog_path": catalog_file, "model_poll_s": 0,
                                                   "catalog_poll_s": 0, "pacing_sync_s": 0})  # fmt: skip
    runtime = Runtime(settings, feature_reader=MemoryReader(), producer_factory=NoKafka())
    assert runtime.state.model is None
    service = LearnService(settings)
    first = served_log(400, seed=5)  # 1,600 impressions: below the trigger
    produce(settings, first)
    consume_all(settings, len(first))
    caplog.set_level(logging.INFO, logger="models.learn_service")
    assert service.step()["decision"] == "waiting"
    more = served_log(500, seed=6)  # 2,000 more: the trigger fires
    more = [Event(**{**e.model_dump(), "ts": e.ts_ms + 3_600_000, "event_id": f"b-{e.event_id}",  # later
                     "request_id": e.request_id and f"b-{e.request_id}"}) for e in more]  # fmt: skip
    produce(settings, more)
    consume_all(settings, len(more))
    before = DECISIONS.labels("promoted")._value.get()
    done = service.step()
    assert done["decision"] == "promoted" and done["trigger"] == "impressions", done
    assert Registry(settings.model_registry_path).promoted() == done["version"]
    assert DECISIONS.labels("promoted")._value.get() == before + 1
    assert service.step()["decision"] == "waiting"  # nothing new since
    lines = [r.getMessage() for r in caplog.records if r.name == "models.learn_service"]
    assert [line.split()[1] for line in lines] == ["waiting", "promoted", "waiting"], lines
    assert runtime.follow_once() is True and runtime.state.model_version == done["version"]
    runtime.stop()
