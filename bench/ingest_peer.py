"""The peer of `bench.ingest`: quixstreams doing a simpler version of the feature consumer's job.

    .venv-bench/bin/python -m bench.ingest_peer --bootstrap HOST:PORT --topic T --redis URL \
        --events N --guarantee at-least-once|exactly-once

Runs in its own venv (`make bench-install`: quixstreams' pins conflict with adloop's) and imports nothing
of adloop. On the same topic as the consumer: per user (the message key), counts per event type in hourly
buckets of event time over 7 days and the last 20 items, kept in quixstreams' state (RocksDB, backed by
its changelog topic); at each checkpoint one Redis hash per user touched since the last one (counts per
type over 24 h and 7 d, the recent items, the latest event time). No validation, dead letters, duplicate
ids, ads, 5-minute windows, offline rows or Feast layout: the peer does less than adloop.

Its settings are quixstreams' documented defaults (commit every 5 s, `auto_offset_reset="earliest"`,
changelog topics on); `--guarantee` picks its two processing guarantees. Prints one JSON line:
{"events": N, "seconds": S, "rate": N/S, "users": U}, timed from the first message processed to the
end of `Application.run` (its final checkpoint, which flushes the sink, included).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from datetime import datetime
from typing import Any

import redis
from quixstreams import Application, State
from quixstreams.sinks import BatchingSink, SinkBatch

HOUR_MS = 3_600_000
WEEK_HOURS = 168
DAY_HOURS = 24
RECENT_N = 20
EVENT_TYPES = ("page_view", "search", "favorite", "add_to_cart", "purchase", "ad_impression", "ad_click",
               "conversion")  # fmt: skip
TYPE_INDEX = {name: n for n, name in enumerate(EVENT_TYPES)}
_first_processed: list[float] = []


def event_ms(ts: Any) -> int:
    """The contract's `ts`: RFC 3339 text or epoch milliseconds."""
    if isinstance(ts, int | float):
        return int(ts)
    return int(datetime.fromisoformat(ts).timestamp() * 1000)


def fold(value: dict[str, Any], state: State) -> dict[str, Any]:
    """One event into its user's state; returns the state (the sink builds the row at the checkpoint)."""
    if not _first_processed:
        _first_processed.append(time.perf_counter())
    ts = event_ms(value["ts"])
    hour = ts // HOUR_MS
    last = max(state.get("last", 0), ts)
    buckets: dict[str, list[int]] = state.get("hours", {})
    if hour > last // HOUR_MS - WEEK_HOURS:
        counts = buckets.setdefault(str(hour), [0] * len(EVENT_TYPES))
        counts[TYPE_INDEX.get(value["event_type"], 0)] += 1
    floor = last // HOUR_MS - WEEK_HOURS
    buckets = {h: c for h, c in buckets.items() if int(h) > floor}
    recent: list[str] = state.get("recent", [])
    if value.get("item_id"):
        recent = [*recent, value["item_id"]][-RECENT_N:]
    state.set("last", last)
    state.set("hours", buckets)
    state.set("recent", recent)
    return {"last": last, "hours": buckets, "recent": recent}


def user_row(summary: dict[str, Any]) -> dict[str, str | int]:
    now = summary["last"] // HOUR_MS
    week = [0] * len(EVENT_TYPES)
    day = [0] * len(EVENT_TYPES)
    for hour, counts in summary["hours"].items():
        age = now - int(hour)
        if 0 <= age < WEEK_HOURS:
            week = [a + b for a, b in zip(week, counts, strict=True)]
            if age < DAY_HOURS:
                day = [a + b for a, b in zip(day, counts, strict=True)]
    row: dict[str, str | int] = {f"{name}_7d": n for name, n in zip(EVENT_TYPES, week, strict=True)}
    row.update({f"{name}_24h": n for name, n in zip(EVENT_TYPES, day, strict=True)})
    row["recent_items"] = json.dumps(summary["recent"])
    row["last_seen_ms"] = summary["last"]
    return row


class UserHashSink(BatchingSink):
    """At each checkpoint: one HSET per user touched in the batch (its latest state), one pipeline."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        self.url, self.prefix = url, prefix
        self.users: set[str] = set()

    def setup(self) -> None:
        self.client = redis.Redis.from_url(self.url)

    def write(self, batch: SinkBatch) -> None:
        latest = {item.key: item.value for item in batch}
        pipe = self.client.pipeline(transaction=False)
        for user, summary in latest.items():
            pipe.hset(f"{self.prefix}{user}", mapping=user_row(summary))
        pipe.execute()
        self.users.update(latest)


def run(bootstrap: str, topic: str, redis_url: str, events: int, guarantee: str) -> dict[str, Any]:
    group = f"bench-peer-{guarantee}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as state_dir:
        app = Application(
            broker_address=bootstrap,
            consumer_group=group,
            auto_offset_reset="earliest",
            processing_guarantee=guarantee,  # type: ignore[arg-type]
            state_dir=state_dir,
            loglevel="WARNING",
        )
        sink = UserHashSink(redis_url, prefix=f"peer:{group}:")
        frame = app.dataframe(app.topic(topic, key_deserializer="str", value_deserializer="json"))
        frame = frame.apply(fold, stateful=True)
        frame.sink(sink)
        app.run(count=events)
        seconds = time.perf_counter() - _first_processed[0]
    return {"events": events, "seconds": seconds, "rate": events / seconds, "users": len(sink.users), "group": group}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--guarantee", choices=("at-least-once", "exactly-once"), default="at-least-once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(args.bootstrap, args.topic, args.redis, args.events, args.guarantee)))


if __name__ == "__main__":
    main()
