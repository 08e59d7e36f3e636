"""Erasure of one user (`adloop users forget ID`, `DELETE /v1/users/{id}`): every store, then a tombstone.

It lives at this layer because it reaches every store below it: the outcomes store (DuckDB), the
offline store's parquet files (training sets), Feast's online rows and the consumer's state in Redis.
What it removes:
- the consumer's state `adloop:{<topic>/<partition>}:user:<id>` (streaming.state_store), from which the features
  would otherwise be re-derived;
- the user's Feast online row (features.online layout: one hash per entity key and project);
- the user's rows in the offline store (`<feast data>/offline/user_activity/*.parquet`), rewritten
  without them;
- the user's events in the outcomes store (impressions, clicks, conversions);
- the user's last click and last impression kept for attribution (outcomes.touch_keys). A click's own
  touch, found by click id, cannot be found by user without scanning every key: it expires with the
  attribution window (`ADLOOP_ATTRIBUTION_WINDOW_S`).
Then it writes the tombstone (features.tombstones) that training sets and the outcomes store honour
for data still on its way. The report says what was removed; running it twice is harmless.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from adloop.settings import Settings
from features import tombstones
from features.online import reference_key
from features.store import JOIN_KEYS, USER_VIEW
from outcomes.store import OutcomeStore
from outcomes.touch_keys import USER_TOUCH_MODELS, user_touch_key
from streaming.consumer import GROUP
from streaming.state_store import StateStore

FEAST_PROJECT = b"adloop"  # features/repo/feature_store.yaml's project


def forget_user(settings: Settings, client: Any, user_id: str) -> dict[str, Any]:
    """Erase `user_id` everywhere adloop keeps it; returns what was removed, per store."""
    erased_at_ms = tombstones.write(settings, client, user_id)
    erased_at = datetime.fromtimestamp(erased_at_ms / 1000, tz=UTC)
    online_key = feast_user_key(user_id)
    removed = {
        "consumer_state": consumer_state(settings, client).forget_users([user_id], range(settings.event_partitions)),
        "online_feature_rows": int(client.delete(online_key)),
        "offline_feature_rows": _forget_offline(settings.feast_data_dir / "offline" / USER_VIEW, user_id),
        "outcome_events": OutcomeStore(settings.outcomes_path).forget(user_id, erased_at),
        # one key at a time: on a cluster they lie in two slots
        "attribution_touches": sum(int(client.delete(user_touch_key(m, user_id))) for m in USER_TOUCH_MODELS),
    }
    return {"user_id": user_id, "erased_at": erased_at.isoformat(), "removed": removed, "tombstone": True}


def consumer_state(settings: Settings, client: Any) -> StateStore:
    """The feature consumer's state store, where a user's state may lie in any partition of the topic."""
    return StateStore(client, group=GROUP, topic=settings.events_topic)


def feast_user_key(user_id: str) -> bytes:
    """The Redis key of the user's Feast row (Feast's own entity-key serialization + the project)."""
    return reference_key(JOIN_KEYS[USER_VIEW], user_id, FEAST_PROJECT)


def _forget_offline(folder: Path, user_id: str) -> int:
    """Rewrite each parquet file holding rows of `user_id` without them; returns the rows removed."""
    removed = 0
    for path in sorted(folder.glob("*.parquet")) if folder.exists() else []:
        table = pq.read_table(path)
        mine = pc.equal(table[JOIN_KEYS[USER_VIEW]], user_id)
        count = pc.sum(mine).as_py() or 0
        if not count:
            continue
        tmp = path.with_suffix(".erasing")
        pq.write_table(table.filter(pc.invert(mine)), tmp)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        removed += count
    return removed
