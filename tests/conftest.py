"""Shared fixtures: the real local stack (Kafka + Redis), started once per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adloop import stack
from adloop.settings import Settings, get_settings

# ADLOOP_SHARED_DATA overrides (a git worktree lives one folder deeper than the checkout ../shared sits beside).
SHARED_DATA = Path(os.environ.get("ADLOOP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def local_stack(settings: Settings) -> Settings:
    """Kafka and Redis up (started if needed, as `adloop stack up` does); fails saying how to start them."""
    try:
        stack.up(settings)
    except stack.StackError as error:
        pytest.fail(f"The local stack could not start ({error}). Start it with `make stack` or `adloop stack up`.")
    return settings


@pytest.fixture
def topic(local_stack: Settings) -> Iterator[str]:
    """A fresh single-use topic, deleted afterwards."""
    from kafka.admin import KafkaAdminClient, NewTopic

    name = f"adloop.test.{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(name, 3, 1)])
    yield name
    admin.delete_topics([name])
    admin.close()


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test (saying why) where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (a fresh clone has no ../shared/data); this test needs the real data set")
    return path
