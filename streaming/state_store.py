"""The consumer's state in Redis: user states, seen event ids, ad counters and applied offsets.

`commit_batch` writes everything a micro-batch produced, together with each partition's last
applied offset, in one MULTI/EXEC: after a crash either all of a batch is there or none of it.

Writers are fenced: the transaction WATCHes the offsets hash and applies only if each of the
batch's partitions still has the applied offset the batch was computed from. A consumer that lost
its partition (expelled from the group, paused) and wakes up with a batch read before its
successor wrote gets `StaleWrite`; nothing of that batch is written, so no state is overwritten
and no offset moves backwards. Stored offsets only ever move forwards.
Keys (prefix `adloop:` by default):
  state:user:<id>        JSON of features.aggregates.UserState
  seen:<event_id>        a processed event id (expires after `seen_ttl_s`)
  ad:<id>                hash: `h:<hour bucket>:<0 impressions|1 clicks>` and `f:<5-min bucket>:<0|1>` counters
  ad_last                sorted set: ad id -> latest event time (ms), only ever raised (ZADD GT)
  offsets:<group>:<topic> hash: partition -> last applied offset
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
import redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.retry import Retry

from features.aggregates import UserState, add_counter

STALE_WRITES = Counter(
    "adloop_consumer_stale_writes_total", "Batches refused because another consumer had moved their partitions."
)
WATCH_ATTEMPTS = 20  # a WATCH fires on any partition's write: retry while ours are unchanged
log = logging.getLogger(__name__)


class StaleWrite(RuntimeError):
    """The batch's partitions moved on since it read them (another consumer owns them now): nothing written."""

    def __init__(self, moved: dict[int, tuple[int | None, int | None]]) -> None:
        detail = ", ".join(f"partition {p}: expected {e}, stored {s}" for p, (e, s) in sorted(moved.items()))
        super().__init__(f"stale batch refused ({detail})")
        self.moved = moved


# `SET <key> 1 EX <ttl>` for every key in one command: a SET per event costs the client a command to
# pack and a reply to parse per id.
_MARK_SEEN = """
for _, key in ipairs(KEYS) do
  redis.call('SET', key, '1', 'EX', ARGV[1])
end
return #KEYS
"""


class StateStore:
    def __init__(
        self, client: redis.Redis, *, group: str, topic: str, prefix: str = "adloop:", seen_ttl_s: int = 8 * 86400
    ):
        self.redis = client
        # The batch's MULTI/EXEC goes through a client that never retries: redis-py retries a pipeline after
        # a connection error (3 times by default), and if the EXEC had applied but its reply was lost, the
        # retry would apply the batch again (HINCRBY counts twice). Without retries the error stops the
        # consumer; on restart the offsets stored with the batch say whether it applied.
        pool = client.connection_pool
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        self.transactions = redis.Redis(connection_pool=redis.ConnectionPool(pool.connection_class, **kwargs))
        self.prefix = prefix
        self.offsets_key = f"{prefix}offsets:{group}:{topic}"
        self.seen_ttl_s = seen_ttl_s

    # --- reads (one round trip each) --------------------------------------------------------

    def applied_offsets(self) -> dict[int, int]:
        return {int(p): int(o) for p, o in self.redis.hgetall(self.offsets_key).items()}

    def reset_offsets(self) -> dict[int, int]:
        """Forget the stored applied offsets (a recreated topic); returns what they were."""
        offsets = self.applied_offsets()
        self.redis.delete(self.offsets_key)
        return offsets

    def seen(self, event_ids: list[str]) -> set[str]:
        if not event_ids:
            return set()
        flags = self.redis.mget([f"{self.prefix}seen:{e}" for e in event_ids])
        return {e for e, flag in zip(event_ids, flags, strict=True) if flag is not None}

    def user_states(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        ids = list(user_ids)
        if not ids:
            return {}
        blobs = self.redis.mget([f"{self.prefix}state:user:{u}" for u in ids])
        return {u: UserState.from_json(orjson.loads(b)) if b else UserState() for u, b in zip(ids, blobs, strict=True)}

    def ad_counters(self, ad_ids: Iterable[str]) -> dict[str, tuple[dict[str, list[int]], dict[str, list[int]], int]]:
        """Per ad: (hour bucket -> [impressions, clicks], 5-min bucket -> [..], latest event ms)."""
        ids = list(ad_ids)
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for ad in ids:
            pipe.hgetall(f"{self.prefix}ad:{ad}")
        pipe.zmscore(f"{self.prefix}ad_last", ids)
        *hashes, lasts = pipe.execute()
        result = {}
        for ad, fields, last in zip(ids, hashes, lasts, strict=True):
            hours: dict[str, list[int]] = {}
            fine: dict[str, list[int]] = {}
            for field, value in fields.items():
                add_counter(hours, fine, field.decode(), int(value))
            result[ad] = (hours, fine, int(last or 0))
        return result

    # --- writes -------------------------------------------------------------------------------

    def drop_ad_counters(self, pipe: Any, stale: dict[str, list[str]]) -> None:
        """Queue HDELs of counter fields that no window can reach any more (keeps ad hashes bounded)."""
        for ad, fields in stale.items():
            if fields:
                pipe.hdel(f"{self.prefix}ad:{ad}", *fields)

    def commit_batch(
        self,
        *,
        states: dict[str, UserState],
        seen_ids: list[str],
        ad_increments: dict[str, dict[str, int]],
        ad_last: dict[str, int],
        offsets: dict[int, int],
        expected: Mapping[int, int | None],
        online: Callable[[Any], None],
    ) -> None:
        """One atomic write: states, seen ids, ad counters, the online feature rows (queued by `online`
        on the transaction) and the partitions' applied offsets.

        `expected`: each partition's applied offset when the batch read its state (None: none stored).
        Raises `StaleWrite` (and writes nothing) when a partition's stored offset differs from it.
        """
        forward = {p: o for p, o in offsets.items() if expected.get(p) is None or o > expected[p]}
        for _ in range(WATCH_ATTEMPTS):
            with self.transactions.pipeline(transaction=True) as pipe:
                pipe.watch(self.offsets_key)
                self._check_fence(pipe, offsets, expected)
                pipe.multi()
                self._queue(pipe, states, seen_ids, ad_increments, ad_last, forward, online)
                try:
                    pipe.execute()
                    return
                except redis.WatchError:
                    # some consumer stored an offset meanwhile, or the connection broke (the EXEC may have
                    # applied): check ours again, which also tells the two cases apart
                    continue
        raise StaleWrite({p: (expected.get(p), None) for p in offsets})  # never settled: treat as lost

    def _check_fence(self, pipe: Any, offsets: dict[int, int], expected: Mapping[int, int | None]) -> None:
        partitions = sorted(offsets)
        if not partitions:
            return
        stored = [None if s is None else int(s) for s in pipe.hmget(self.offsets_key, [str(p) for p in partitions])]
        moved = {p: (expected.get(p), s) for p, s in zip(partitions, stored, strict=True) if s != expected.get(p)}
        if moved:
            pipe.reset()
            STALE_WRITES.inc()
            error = StaleWrite(moved)
            log.warning("%s: another consumer owns them now, or this batch's own write applied and its reply was lost",
                        error)  # fmt: skip
            raise error

    def _queue(
        self,
        pipe: Any,
        states: dict[str, UserState],
        seen_ids: list[str],
        ad_increments: dict[str, dict[str, int]],
        ad_last: dict[str, int],
        offsets: dict[int, int],
        online: Callable[[Any], None],
    ) -> None:
        if states:
            pipe.mset({f"{self.prefix}state:user:{u}": orjson.dumps(s.to_json()) for u, s in states.items()})
        if seen_ids:
            keys = [f"{self.prefix}seen:{event_id}" for event_id in seen_ids]
            pipe.register_script(_MARK_SEEN)(keys=keys, args=[self.seen_ttl_s], client=pipe)
        for ad, fields in ad_increments.items():
            for field, amount in fields.items():
                pipe.hincrby(f"{self.prefix}ad:{ad}", field, amount)
        if ad_last:
            pipe.zadd(f"{self.prefix}ad_last", ad_last, gt=True)
        online(pipe)
        if offsets:
            pipe.hset(self.offsets_key, mapping={str(p): o for p, o in offsets.items()})
