"""Tombstones of erased users: who was forgotten, and when.

Erasure (`outcomes.erasure.forget_user`) deletes what it can reach at once and then leaves a
tombstone, so that data still on its way (events in Kafka, a replay, an offline file written by a
consumer batch in flight) is dropped where it lands: training sets (features.offline,
models.dataset) and the outcomes store skip every row of an erased user dated at or before the
erasure. Events after it are new activity and count again.

A tombstone is written twice: in Redis (`adloop:tombstones`, a hash user id -> erased-at epoch ms:
shared by every machine of a deployment) and in a JSON-lines file under the stack folder (read when
Redis is unreachable, e.g. offline training). Readers take the union, latest erasure per user.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from adloop.settings import Settings
from features.redis_client import redis_client

log = logging.getLogger(__name__)

REDIS_KEY = "adloop:tombstones"
FILE_NAME = "tombstones.jsonl"


def path_of(settings: Settings) -> Path:
    return Path(settings.stack_dir) / FILE_NAME


def write(settings: Settings, client: Any, user_id: str, *, at_ms: int | None = None) -> int:
    """Record that `user_id` was erased at `at_ms` (now by default); returns that time."""
    at_ms = int(time.time() * 1000) if at_ms is None else at_ms
    client.hset(REDIS_KEY, user_id, at_ms)
    path = path_of(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as file:  # one short append per erasure: atomic enough on a local file system
        file.write(orjson.dumps({"user_id": user_id, "erased_at_ms": at_ms}) + b"\n")
    return at_ms


def erased(settings: Settings, client: Any | None = None) -> dict[str, int]:
    """user id -> the latest erasure's epoch ms, from the file and (when reachable) Redis."""
    out: dict[str, int] = {}
    path = path_of(settings)
    if path.exists():
        for line in path.read_bytes().splitlines():
            if line.strip():
                entry = orjson.loads(line)
                out[entry["user_id"]] = max(out.get(entry["user_id"], 0), int(entry["erased_at_ms"]))
    try:
        client = client if client is not None else redis_client(settings, timeout_s=2.0)
        for user, at in client.hgetall(REDIS_KEY).items():
            user = user.decode() if isinstance(user, bytes) else user
            out[user] = max(out.get(user, 0), int(at))
    except (redis.RedisError, OSError) as error:
        log.warning("tombstones: Redis unreachable (%s); using %s only", type(error).__name__, path)
    return out


def erased_among(client: Any, user_ids: list[str]) -> dict[str, int]:
    """user id -> erasure epoch ms, for those of `user_ids` that were erased (one HMGET: the consumer's
    per-batch check; Redis is the consumer's store anyway, so the file fallback is not needed there)."""
    if not user_ids:
        return {}
    values = client.hmget(REDIS_KEY, user_ids)
    return {u: int(v) for u, v in zip(user_ids, values, strict=True) if v is not None}


def keep_mask(user_ids: Any, ts_ms: Any, tombstones: dict[str, int]) -> np.ndarray:
    """Boolean mask of the rows to keep: not of a user erased at or after the row's time."""
    users = np.asarray(user_ids, dtype=object)
    times = np.asarray(ts_ms, dtype=np.int64)
    if not tombstones or len(users) == 0:
        return np.ones(len(users), dtype=bool)
    erased_at = np.array([tombstones.get(u, -1) for u in users], dtype=np.int64)
    return times > erased_at
