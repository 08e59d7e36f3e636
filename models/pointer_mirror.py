"""The promoted pointer mirrored in Redis, for serving replicas that do not share the registry folder.

`Registry.promote`, `rollback` and `request_reload` write the folder's pointer first (the registry's
truth) and then one Redis hash, `adloop:model:promoted` (fields `version`, `promoted_at`, `generation`),
through the one Redis factory (`features.redis_client`: standalone or cluster; a single key, so any
cluster slot). `Registry.pointer`, what every serving process polls, reads Redis first and the folder
as the fallback; when both answer, the later promotion wins (and the higher reload generation), so a
Redis write that failed after a promotion, or a folder that another machine cannot see, never holds a
process back on an older version.

Only the pointer travels through Redis: a replica still loads the version's artifacts from its own
`model_registry_path`, so that path must hold them (a shared volume, or a copy synced before the
promotion); a version whose artifacts are missing there fails to load and the old model keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from adloop.settings import Settings
from features.redis_client import redis_client

log = logging.getLogger(__name__)

KEY = "adloop:model:promoted"


class PointerMirror:
    def __init__(self, settings: Settings, *, timeout_s: float = 1.0, key: str = KEY) -> None:
        self.key = key
        self._client = redis_client(settings, timeout_s=timeout_s, retries=False)  # a poll never waits on retries

    def write(self, version: str, promoted_at: float) -> bool:
        """Mirror a promotion or rollback; False (logged) when Redis cannot be written."""
        try:
            self._client.hset(self.key, mapping={"version": version, "promoted_at": repr(promoted_at)})
            return True
        except Exception as error:  # the folder holds the promotion; replicas on Redis alone lag until the next one
            log.warning("promoted %s, but could not mirror it in Redis (%s): %s", version, self.key, error)
            return False

    def bump_generation(self, generation: int) -> None:
        """Mirror the reload generation (never lowers it: HSET of the max, read then written)."""
        try:
            current = int(self._client.hget(self.key, "generation") or 0)
            self._client.hset(self.key, "generation", max(current, generation))
        except Exception as error:
            log.warning("could not mirror reload generation %d in Redis (%s): %s", generation, self.key, error)

    def read(self) -> dict[str, Any] | None:
        """{"version", "promoted_at", "generation"} from Redis; None when unreachable or never written."""
        try:
            data = self._client.hgetall(self.key)
        except Exception as error:
            log.debug("promoted pointer not readable from Redis: %s", error)
            return None
        if not data:
            return None
        text = {k.decode(): v.decode() for k, v in data.items()}
        return {"version": text.get("version"), "promoted_at": float(text["promoted_at"]) if "promoted_at" in text
                else None, "generation": int(text.get("generation") or 0)}  # fmt: skip


def merged(redis_side: dict[str, Any] | None, folder: dict[str, Any]) -> dict[str, Any]:
    """The pointer to follow: Redis first, the folder as the fallback; when both name a version, the later
    promotion; the higher reload generation."""
    if redis_side is None:
        return folder
    generation = max(int(redis_side.get("generation") or 0), int(folder.get("generation") or 0))
    newer = redis_side
    if folder.get("version") and (redis_side.get("promoted_at") or 0) < (folder.get("promoted_at") or 0):
        newer = folder
    if not newer.get("version"):
        newer = folder
    return {"version": newer.get("version"), "promoted_at": newer.get("promoted_at"), "generation": generation}
