"""The consumer's state in Redis, one hash tag per partition: user states, ad counters, applied offset.

Everything a Kafka partition's batch changes lives under that partition's hash tag
(`adloop:{<topic>/<partition>}:`), so on Redis Cluster it sits on one slot, and `commit` writes it
in one script: atomic on standalone Redis and on a cluster alike. After a crash either all of a
partition's batch is there or none of it.

Writers are fenced: the script applies only if the partition's stored offset is still the one the
batch was computed from. A consumer that lost its partition (expelled from the group, paused) and
wakes up with a batch read before its successor wrote gets `StaleWrite`; nothing is written, so no
state is overwritten and no offset moves backwards. The fence also makes a resent script harmless:
a client that retries after a lost reply finds its own offset stored and gets `StaleWrite`, and the
consumer reads on from the stored offset.

Keys under the partition's tag `adloop:{<topic>/<p>}:` (all with an expiry or an owner):
  user:<id>        JSON of features.aggregates.UserState (with its recent event ids), expires when idle
  ad:<id>          hash: `h:<hour bucket>:<0 impressions|1 clicks>` and `f:<5-min bucket>:<0|1>`
                   counters of this partition's events; an ad's counts are the sum over partitions
  ad_last          sorted set: ad id -> latest event time (ms) in this partition, only ever raised
  art:<id>, next:<id>  hashes of features.article_flow's counters of this partition's clicks (summed,
                   minimised or maximised by field name over partitions when read)
  offset:<group>   the group's last applied offset of the partition
  written:<group>  JSON {"users", "ads", "articles", "pairs"} of the last batch: whose online rows follow the
                   commit (features.online.write_rows_if_newer), so a consumer that takes the partition
                   over rewrites them when the previous owner died between the two writes
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter

from features.aggregates import UserState, add_counter
from features.article_flow import Counters, field_op, merge_field

STALE_WRITES = Counter(
    "adloop_consumer_stale_writes_total", "Batches refused because another consumer had moved their partitions."
)
STATE_TTL_S = 30 * 86400  # a user idle this long is forgotten (Feast's views look back 7 days)
log = logging.getLogger(__name__)

# KEYS: offset, ad_last, written, users..., ad hashes..., flow hashes...
# ARGV: expected offset ('' = none stored), new offset, users count, ads count, state ttl, counter ttl,
#       written blob, flow hashes count, user blobs..., then per ad: increments count, deletions count,
#       (field, amount)..., field..., then per flow hash: increments, minima, maxima and deletions counts,
#       (field, amount)..., (field, value)..., (field, value)..., field..., and last the ad_last (ms, ad id) pairs.
_COMMIT = """
local stored = redis.call('GET', KEYS[1])
if (stored or '') ~= ARGV[1] then return {0, stored or ''} end
local users, ads, state_ttl, counter_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local flows = tonumber(ARGV[8])
local a = 9
for i = 1, users do
  redis.call('SET', KEYS[3 + i], ARGV[a], 'EX', state_ttl)
  a = a + 1
end
for i = 1, ads do
  local key, increments, deletions = KEYS[3 + users + i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, increments do
    redis.call('HINCRBY', key, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  for _ = 1, deletions do
    redis.call('HDEL', key, ARGV[a])
    a = a + 1
  end
  if increments > 0 then redis.call('EXPIRE', key, counter_ttl) end
end
for i = 1, flows do
  local key = KEYS[3 + users + ads + i]
  local adds, mins, maxes, deletions = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3])
  a = a + 4
  for _ = 1, adds do
    redis.call('HINCRBY', key, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  for _ = 1, mins + maxes do
    local old = redis.call('HGET', key, ARGV[a])
    local lower = mins > 0
    if old then
      local value, held = tonumber(ARGV[a + 1]), tonumber(old)
      if (lower and value < held) or (not lower and value > held) then redis.call('HSET', key, ARGV[a], ARGV[a + 1]) end
    else
      redis.call('HSET', key, ARGV[a], ARGV[a + 1])
    end
    mins = mins - 1
    a = a + 2
  end
  for _ = 1, deletions do
    redis.call('HDEL', key, ARGV[a])
    a = a + 1
  end
  redis.call('EXPIRE', key, counter_ttl)
end
local raised = a < #ARGV
while a < #ARGV do
  redis.call('ZADD', KEYS[2], 'GT', ARGV[a], ARGV[a + 1])
  a = a + 2
end
if raised then redis.call('EXPIRE', KEYS[2], counter_ttl) end
redis.call('SET', KEYS[3], ARGV[7])
redis.call('SET', KEYS[1], ARGV[2])
return {1}
"""
COUNTER_TTL_S = 8 * 86400  # an ad's counters outlive its 7-day window, then expire if the partition never sees it


class StaleWrite(RuntimeError):
    """The batch's partitions moved on since it read them (another consumer owns them now): nothing written."""

    def __init__(self, moved: dict[int, tuple[int | None, int | None]]) -> None:
        detail = ", ".join(f"partition {p}: expected {e}, stored {s}" for p, (e, s) in sorted(moved.items()))
        super().__init__(f"stale batch refused ({detail})")
        self.moved = moved


@dataclass
class PartitionBatch:
    """What one partition's batch writes: user states, ad counter increments and latest times, and the
    counter fields that no window reaches any more."""

    offset: int
    expected: int | None  # the stored offset the batch was computed from
    states: dict[str, UserState] = field(default_factory=dict)
    ad_increments: dict[str, dict[str, int]] = field(default_factory=dict)
    ad_last: dict[str, int] = field(default_factory=dict)
    stale_counters: dict[str, list[str]] = field(default_factory=dict)
    ads_written: list[str] = field(default_factory=list)  # ads whose online rows follow (all partitions' sums)
    flow: Counters = field(default_factory=dict)  # features.article_flow increments of the batch's clicks
    flow_stale: dict[tuple[str, Hashable], list[str]] = field(default_factory=dict)  # fields no row reads
    articles_written: list[str] = field(default_factory=list)  # articles and pairs whose online rows follow
    pairs_written: list[list[str]] = field(default_factory=list)


class StateStore:
    def __init__(self, client: Any, *, group: str, topic: str, prefix: str = "adloop:") -> None:
        self.redis = client
        self.group = group
        self.topic = topic
        self.prefix = prefix
        self._commit = client.register_script(_COMMIT)

    def tag(self, partition: int) -> str:
        return f"{self.prefix}{{{self.topic}/{partition}}}:"

    def user_key(self, partition: int, user_id: str) -> str:
        return f"{self.tag(partition)}user:{user_id}"

    # --- reads (one round trip each) --------------------------------------------------------

    def applied_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        parts = sorted(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.get(f"{self.tag(p)}offset:{self.group}")
        return {p: int(o) for p, o in zip(parts, pipe.execute(), strict=True) if o is not None}

    def reset_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """Forget the stored applied offsets (a recreated topic); returns what they were."""
        offsets = self.applied_offsets(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in offsets:
            pipe.delete(f"{self.tag(p)}offset:{self.group}")
        pipe.execute()
        return offsets

    def user_states(self, users: Iterable[tuple[int, str]]) -> dict[tuple[int, str], UserState]:
        ids = list(users)
        if not ids:
            return {}
        by_partition: dict[int, list[str]] = {}
        for p, u in ids:
            by_partition.setdefault(p, []).append(u)
        pipe = self.redis.pipeline(transaction=False)
        for p, users_of_p in by_partition.items():  # one MGET per partition: its users share a slot
            # (execute_command: redis-py's cluster pipeline refuses `mget()` but routes a one-slot MGET)
            pipe.execute_command("MGET", *[self.user_key(p, u) for u in users_of_p])
        states = {}
        for (p, users_of_p), blobs in zip(by_partition.items(), pipe.execute(), strict=True):
            for u, blob in zip(users_of_p, blobs, strict=True):
                states[(p, u)] = UserState.from_json(orjson.loads(blob)) if blob else UserState()
        return states

    def written(self, partition: int) -> dict[str, list[Any]]:
        """The users, ads, articles and pairs ([a, b]) of the partition's last committed batch (their online
        rows follow the commit)."""
        blob = self.redis.get(f"{self.tag(partition)}written:{self.group}")
        data = orjson.loads(blob) if blob else {}
        return {kind: data.get(kind, []) for kind in ("users", "ads", "articles", "pairs")}

    def flow_fields(
        self, wanted: dict[tuple[str, str], list[str] | None], partitions: Iterable[int]
    ) -> dict[tuple[str, str], dict[str, int]]:
        """features.article_flow hashes merged over `partitions`: per (kind, article) the listed fields
        (None: all of them)."""
        keys, parts = list(wanted), sorted(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            tag = self.tag(p)
            for kind, article in keys:
                names = wanted[(kind, article)]
                if names is None:
                    pipe.hgetall(f"{tag}{kind}:{article}")
                else:
                    pipe.hmget(f"{tag}{kind}:{article}", names)
        replies = iter(pipe.execute())
        merged: dict[tuple[str, str], dict[str, int]] = {key: {} for key in keys}
        for _ in parts:
            for key in keys:
                reply, fields = next(replies), merged[key]
                if isinstance(reply, dict):
                    for name, value in reply.items():
                        merge_field(fields, name.decode(), int(value))
                else:
                    for name, value in zip(wanted[key] or (), reply, strict=True):
                        if value is not None:
                            merge_field(fields, name, int(value))
        return merged

    def ad_counters(
        self, ad_ids: Iterable[str], partitions: Iterable[int]
    ) -> dict[str, tuple[dict[str, list[int]], dict[str, list[int]], int]]:
        """Per ad, summed over `partitions`: (hour bucket -> [impressions, clicks], 5-min bucket -> [..],
        latest event ms)."""
        ids, parts = list(ad_ids), sorted(partitions)
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            tag = self.tag(p)
            for ad in ids:
                pipe.hgetall(f"{tag}ad:{ad}")
            pipe.zmscore(f"{tag}ad_last", ids)
        replies = iter(pipe.execute())
        result = {ad: ({}, {}, 0) for ad in ids}
        for _ in parts:
            hashes = [next(replies) for _ in ids]
            lasts = next(replies)
            for ad, fields, last in zip(ids, hashes, lasts, strict=True):
                hours, fine, latest = result[ad]
                for name, value in fields.items():
                    add_counter(hours, fine, name.decode(), int(value))
                result[ad] = (hours, fine, max(latest, int(last or 0)))
        return result

    # --- writes -------------------------------------------------------------------------------

    def commit(self, partition: int, batch: PartitionBatch) -> None:
        """One atomic, fenced write of a partition's batch; `StaleWrite` (nothing written) when the
        partition's stored offset is not `batch.expected`."""
        tag = self.tag(partition)
        users = list(batch.states)
        ads = sorted(set(batch.ad_increments) | set(batch.stale_counters))
        flows = list(batch.flow)
        keys = [f"{tag}offset:{self.group}", f"{tag}ad_last", f"{tag}written:{self.group}"]
        keys += [f"{tag}user:{u}" for u in users] + [f"{tag}ad:{ad}" for ad in ads]
        keys += [f"{tag}{kind}:{article}" for kind, article in flows]
        written = orjson.dumps({"users": users, "ads": batch.ads_written, "articles": batch.articles_written,
                                "pairs": batch.pairs_written})  # fmt: skip
        args: list[Any] = ["" if batch.expected is None else batch.expected, batch.offset, len(users), len(ads),
                           STATE_TTL_S, COUNTER_TTL_S, written, len(flows)]  # fmt: skip
        args += [orjson.dumps(batch.states[u].to_json()) for u in users]
        for ad in ads:
            increments = batch.ad_increments.get(ad, {})
            stale = [f for f in batch.stale_counters.get(ad, ()) if f not in increments]
            args += [len(increments), len(stale)]
            for name, amount in increments.items():
                args += [name, amount]
            args += stale
        for key in flows:
            args += _flow_args(batch.flow[key], batch.flow_stale.get(key, ()))
        for ad, ms in batch.ad_last.items():
            args += [ms, ad]
        reply = self._commit(keys=keys, args=args)
        if reply[0] != 1:
            stored = int(reply[1]) if reply[1] else None
            STALE_WRITES.inc()
            error = StaleWrite({partition: (batch.expected, stored)})
            log.warning("%s: another consumer owns it now, or this batch's own write applied and its reply was lost",
                        error)  # fmt: skip
            raise error

    def forget_users(self, user_ids: Iterable[str], partitions: Iterable[int]) -> int:
        """Delete these users' states in every partition (erasure); returns how many keys existed."""
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            for u in user_ids:
                pipe.delete(self.user_key(p, u))
        return sum(pipe.execute())


def _flow_args(fields: dict[str, int], stale: Iterable[str]) -> list[Any]:
    """One flow hash's part of the commit's arguments: counts, then additions, minima, maxima, deletions."""
    by_op: dict[str, list[Any]] = {"add": [], "min": [], "max": []}
    for name, value in fields.items():
        by_op[field_op(name)] += [name, value]
    gone = [name for name in stale if name not in fields]
    counts = [len(by_op["add"]) // 2, len(by_op["min"]) // 2, len(by_op["max"]) // 2, len(gone)]
    return [*counts, *by_op["add"], *by_op["min"], *by_op["max"], *gone]
