"""Settings of their own for a run that must not touch the deployment's data: tests, benchmarks and the
evaluation through the pipeline.

A fresh events + dead-letter topic pair, an emptied Redis database, and Feast data, registry,
outcomes and report under one folder; the topics are deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kafka.admin import NewTopic

from adloop.settings import Settings
from features import store
from features.redis_client import redis_client as open_redis
from streaming import kafka_clients


@contextmanager
def isolated_settings(
    base: Settings,
    folder: Path,
    *,
    redis_db: int,
    prefix: str = "adloop.run",
    partitions: int | None = None,
    empty_after: bool = False,
    **overrides: Any,
) -> Iterator[Settings]:
    """`base` moved onto its own topics (`<prefix>.<random>`, `partitions` or the settings' count), Redis
    database `redis_db` (emptied first, and afterwards with `empty_after`) and files under `folder`."""
    topic = f"{prefix}.{uuid.uuid4().hex[:10]}"
    admin = kafka_clients.admin(base)
    admin.create_topics([NewTopic(topic, partitions or base.event_partitions, 1), NewTopic(topic + ".dlq", 1, 1)])
    settings = base.model_copy(
        update={
            "events_topic": topic,
            "dlq_topic": topic + ".dlq",
            "redis_url": with_db(base.redis_url, redis_db),
            "feast_data_dir": folder / "feast",
            "model_registry_path": folder / "models",
            "outcomes_path": folder / "outcomes.duckdb",
            "report_dir": folder / "report",
            **overrides,
        }
    )
    client = open_redis(settings)
    client.flushdb()
    store.apply(settings)
    try:
        yield settings
    finally:
        if empty_after:
            client.flushdb()
        client.close()
        admin.delete_topics([topic, topic + ".dlq"])
        admin.close()


def with_db(url: str, db: int) -> str:
    """The Redis URL `url` pointed at database `db` (credentials, host and options kept)."""
    parsed = urlparse(url)
    return parsed._replace(path=f"/{db}").geturl()
