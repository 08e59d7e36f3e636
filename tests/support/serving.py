"""Serving stand-ins: an in-memory feature reader, a Kafka that is down, a free port."""

from __future__ import annotations

import socket
from typing import Any


class MemoryReader:
    """A `FeatureReader` over dicts (unit tests need no Redis)."""

    def __init__(self, users: dict[str, dict[str, Any]] | None = None, ads: dict[str, dict] | None = None):
        self.users = users or {}
        self.ad_rows = ads or {}

    def user(self, user_id: str) -> dict[str, Any]:
        return dict(self.users.get(user_id, {}))

    def ads(self, ad_ids):
        return {a: self.ad_rows[a] for a in ad_ids if a in self.ad_rows}


class NoKafka:
    """A producer factory for tests that are not about Kafka: the logger buffers (Kafka 'down')."""

    def __call__(self):
        raise ConnectionError("Kafka is not used in this test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
