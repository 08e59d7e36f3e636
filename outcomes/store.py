"""Outcomes in DuckDB: the ad events landed from Kafka, and the queries analysts ask of them.

`OutcomeStore` opens the DuckDB file only for the duration of one write or one query: DuckDB
locks a file per process, and the API, the lander and `adloop report` are separate processes.
A joined impression is one row of `ad_impression`; its click and conversion are found by
`request_id` + `ad_id`, so the impression decides the arm, model version and segment.
Writes are `INSERT OR IGNORE` on the primary key `event_id`: an event landed twice counts once.
An erased user's events (`forget`) are deleted, and a tombstone keeps any of their events dated at or
before the erasure from landing again (a replay, a late batch).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from outcomes.estimators import Lift, lift
from streaming.events import Event

log = logging.getLogger(__name__)
LOCK_WAIT_S = 10.0  # another process holds the file: retry this long

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id VARCHAR PRIMARY KEY, event_type VARCHAR NOT NULL, ts TIMESTAMPTZ NOT NULL,
    user_id VARCHAR NOT NULL, request_id VARCHAR, ad_id VARCHAR, campaign_id VARCHAR, slot_id VARCHAR,
    position INTEGER, model_version VARCHAR, arm VARCHAR, propensity DOUBLE,
    device VARCHAR, country VARCHAR, source VARCHAR, context JSON
);
CREATE TABLE IF NOT EXISTS dead_letters (
    topic VARCHAR, "partition" INTEGER, "offset" BIGINT, reason VARCHAR, landed_at TIMESTAMPTZ,
    PRIMARY KEY (topic, "partition", "offset")
);
CREATE TABLE IF NOT EXISTS tombstones (user_id VARCHAR PRIMARY KEY, erased_at TIMESTAMPTZ NOT NULL);
"""
COLUMNS = ("event_id", "event_type", "ts", "user_id", "request_id", "ad_id", "campaign_id", "slot_id", "position",
           "model_version", "arm", "propensity", "device", "country", "source", "context")  # fmt: skip
# group_by name -> SQL over the joined impression (alias i) and the user's activity level
DIMENSIONS = {
    "ad": "i.ad_id",
    "campaign": "coalesce(i.campaign_id, '(none)')",
    "arm": "coalesce(i.arm, '(none)')",
    "model_version": "coalesce(i.model_version, '(none)')",
    "device": "coalesce(i.device, '(unknown)')",
    "country": "coalesce(i.country, '(unknown)')",
    "activity": "a.activity",
    "segment": "a.activity || '/' || coalesce(i.device, '(unknown)') || '/' || coalesce(i.country, '(unknown)')",
    "minute": "strftime(date_trunc('minute', i.ts AT TIME ZONE 'UTC'), '%Y-%m-%dT%H:%M:00Z')",
    "hour": "strftime(date_trunc('hour', i.ts AT TIME ZONE 'UTC'), '%Y-%m-%dT%H:00:00Z')",
}
# Activity level of a user: impressions in the queried range (the filters apply first).
ACTIVITY_SQL = "CASE WHEN count(*) >= 10 THEN 'heavy' WHEN count(*) >= 3 THEN 'medium' ELSE 'light' END"


@dataclass(frozen=True)
class Filters:
    """Restrict the impressions counted (time on the impression's event time, bounds [start, end))."""

    start: datetime | None = None
    end: datetime | None = None
    ad_id: str | None = None
    campaign_id: str | None = None
    arm: str | None = None
    model_version: str | None = None


class OutcomeStore:
    """The DuckDB file of outcomes; every call opens and closes its own connection."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def setup(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def write(self, events: Sequence[Event], dead_letters: Sequence[tuple[str, int, int, str]] = ()) -> int:
        """Insert events (and dead letters) once; returns how many events were new."""
        with self._connect() as db:
            before = db.execute("SELECT count(*) FROM events").fetchall()[0][0]
            if events:  # one columnar insert (executemany runs a statement per row: ~1 ms each)
                db.register("batch", _table(events))
                db.execute(
                    "INSERT OR IGNORE INTO events SELECT b.* FROM batch b LEFT JOIN tombstones t USING (user_id) "
                    "WHERE t.user_id IS NULL OR b.ts > t.erased_at"
                )
                db.unregister("batch")
            if dead_letters:
                db.executemany(
                    "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, now())", [list(d) for d in dead_letters]
                )
            return db.execute("SELECT count(*) FROM events").fetchall()[0][0] - before

    def forget(self, user_id: str, erased_at: datetime) -> int:
        """Delete `user_id`'s events dated at or before `erased_at` and keep them out from now on; returns
        how many were deleted."""
        self.setup()
        with self._connect() as db:
            deleted = db.execute(
                "SELECT count(*) FROM events WHERE user_id = ? AND ts <= ?", [user_id, erased_at]
            ).fetchall()[0][0]
            db.execute("DELETE FROM events WHERE user_id = ? AND ts <= ?", [user_id, erased_at])
            db.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", [user_id, erased_at])
        return deleted

    def outcomes(self, group_by: Sequence[str] = (), filters: Filters | None = None) -> list[dict[str, Any]]:
        """Impressions, clicks, CTR and conversions per group (no group: one total row)."""
        unknown = [g for g in group_by if g not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown group_by {unknown}; choose from {', '.join(DIMENSIONS)}")
        where, params = _where(filters or Filters())
        keys = [f'{DIMENSIONS[g]} AS "{g}"' for g in group_by]
        select = ", ".join([*keys, "count(*) AS impressions", "count(c.request_id) AS clicks",
                            "count(v.request_id) AS conversions"])  # fmt: skip
        positions = ", ".join(str(i + 1) for i in range(len(group_by)))
        group = f"GROUP BY {positions} ORDER BY {positions}" if group_by else ""
        sql = f"""
            WITH i AS (SELECT * FROM events WHERE event_type = 'ad_impression' {where}),
            c AS (SELECT DISTINCT request_id, ad_id FROM events WHERE event_type = 'ad_click'),
            v AS (SELECT DISTINCT request_id, ad_id FROM events WHERE event_type = 'conversion'),
            a AS (SELECT user_id, {ACTIVITY_SQL} AS activity FROM i GROUP BY user_id)
            SELECT {select}
            FROM i LEFT JOIN c ON c.request_id = i.request_id AND c.ad_id = i.ad_id
                   LEFT JOIN v ON v.request_id = i.request_id AND v.ad_id = i.ad_id
                   JOIN a ON a.user_id = i.user_id
            {group}"""
        with self._connect(read_only=True) as db:
            cursor = db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        for row in rows:
            row["ctr"] = row["clicks"] / row["impressions"] if row["impressions"] else None
        return rows if group_by or rows[0]["impressions"] else [{"impressions": 0, "clicks": 0, "conversions": 0,
                                                                   "ctr": None}]  # fmt: skip

    def per_user(self, filters: Filters | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """arm -> (impressions, clicks) per user: the lift's user-clustered intervals."""
        where, params = _where(filters or Filters())
        sql = f"""
            SELECT i.arm, i.user_id, count(*), count(c.request_id)
            FROM (SELECT * FROM events WHERE event_type = 'ad_impression' {where}) i
            LEFT JOIN (SELECT DISTINCT request_id, ad_id FROM events WHERE event_type = 'ad_click') c
              ON c.request_id = i.request_id AND c.ad_id = i.ad_id
            GROUP BY 1, 2"""
        with self._connect(read_only=True) as db:
            rows = db.execute(sql, params).fetchall()
        arms: dict[str, tuple[list[int], list[int]]] = {}
        for arm, _user, impressions, clicks in rows:
            counts = arms.setdefault(arm, ([], []))
            counts[0].append(impressions)
            counts[1].append(clicks)
        return {arm: (np.array(n), np.array(y)) for arm, (n, y) in arms.items()}

    def lift(self, filters: Filters | None = None, confidence: float = 0.95) -> Lift:
        """Lift of targeted over control, with binomial and user-clustered intervals."""
        arms = {r["arm"]: r for r in self.outcomes(["arm"], filters)}
        t, c = arms.get("targeted", {}), arms.get("control", {})
        users = self.per_user(filters)
        empty = (np.zeros(0), np.zeros(0))
        return lift(t.get("clicks", 0), t.get("impressions", 0), c.get("clicks", 0), c.get("impressions", 0),
                    confidence, users=(users.get("targeted", empty), users.get("control", empty)))  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Events landed per type, and dead letters per reason (`dlq:<reason>`)."""
        with self._connect(read_only=True) as db:
            events = db.execute("SELECT event_type, count(*) FROM events GROUP BY 1").fetchall()
            dead = db.execute("SELECT reason, count(*) FROM dead_letters GROUP BY 1").fetchall()
        return {**dict(events), **{f"dlq:{r}": n for r, n in dead}}

    def logged(self, filters: Filters | None = None) -> list[dict[str, Any]]:
        """The joined impressions as rows (arm, model_version, ad_id, propensity, clicked): for estimators."""
        where, params = _where(filters or Filters())
        sql = f"""
            SELECT i.arm, i.model_version, i.ad_id, i.propensity, c.request_id IS NOT NULL AS clicked
            FROM (SELECT * FROM events WHERE event_type = 'ad_impression' {where}) i
            LEFT JOIN (SELECT DISTINCT request_id, ad_id FROM events WHERE event_type = 'ad_click') c
              ON c.request_id = i.request_id AND c.ad_id = i.ad_id"""
        with self._connect(read_only=True) as db:
            cursor = db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

    @contextmanager
    def _connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            self.setup()
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                db = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as error:  # "Could not set lock": another process has it open
                if time.monotonic() > deadline:
                    raise
                log.debug("outcomes file busy (%s); retrying", error)
                time.sleep(0.05)
        try:
            yield db
        finally:
            db.close()


def _table(events: Sequence[Event]) -> pa.Table:
    """The events as an Arrow table in `COLUMNS` order (`ts` as UTC microseconds)."""
    unique = {e.event_id: e for e in reversed(events)}  # a repeated id inside one batch: the first one counts
    rows = [_row(e) for e in reversed(unique.values())]
    types = {"ts": pa.timestamp("us", tz="UTC"), "position": pa.int32(), "propensity": pa.float64()}
    return pa.table({name: pa.array([r[i] for r in rows], type=types.get(name, pa.string()))
                     for i, name in enumerate(COLUMNS)})  # fmt: skip


def _row(event: Event) -> list[Any]:
    context = event.context or {}
    return [
        event.event_id, event.event_type.value, event.ts, event.user_id, event.request_id, event.ad_id,
        event.campaign_id, event.slot_id, event.position, event.model_version, event.arm, event.propensity,
        _text(context.get("device")), _text(context.get("country")), event.source,
        json.dumps(context) if context else None,
    ]  # fmt: skip


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _where(filters: Filters) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for column, value, op in (("ts", filters.start, ">="), ("ts", filters.end, "<"), ("ad_id", filters.ad_id, "="),
                              ("campaign_id", filters.campaign_id, "="), ("arm", filters.arm, "="),
                              ("model_version", filters.model_version, "=")):  # fmt: skip
        if value is not None:
            clauses.append(f"AND {column} {op} ?")
            params.append(value)
    return " ".join(clauses), params
