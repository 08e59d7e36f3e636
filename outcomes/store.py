"""Outcomes in DuckDB: the ad events landed from Kafka, and the queries analysts ask of them.

`OutcomeStore` opens the DuckDB file only for the duration of one write or one query: DuckDB
locks a file per process, and the API, the lander and `adloop report` are separate processes.
A joined impression is one row of `ad_impression`; its click and conversions are found by
`request_id` + `ad_id`, so the impression decides the arm, model version and segment. Money: a
conversion's `value` is revenue; an event's `cost` is what was charged for it (a CPM impression, a CPC
click), so spend = the impression's cost + its click's. Unattributed conversions (no request) are
counted apart (`unattributed`).
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

from models.estimators import Lift, clustered, lift
from streaming.events import Event

log = logging.getLogger(__name__)
LOCK_WAIT_S = 10.0  # another process holds the file: retry this long

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id VARCHAR PRIMARY KEY, event_type VARCHAR NOT NULL, ts TIMESTAMPTZ NOT NULL,
    user_id VARCHAR NOT NULL, request_id VARCHAR, ad_id VARCHAR, campaign_id VARCHAR, slot_id VARCHAR,
    position INTEGER, model_version VARCHAR, arm VARCHAR, propensity DOUBLE,
    device VARCHAR, country VARCHAR, source VARCHAR, context JSON, value DOUBLE, currency VARCHAR, cost DOUBLE
);
ALTER TABLE events ADD COLUMN IF NOT EXISTS value DOUBLE;
ALTER TABLE events ADD COLUMN IF NOT EXISTS currency VARCHAR;
ALTER TABLE events ADD COLUMN IF NOT EXISTS cost DOUBLE;
CREATE TABLE IF NOT EXISTS dead_letters (
    topic VARCHAR, "partition" INTEGER, "offset" BIGINT, reason VARCHAR, landed_at TIMESTAMPTZ,
    PRIMARY KEY (topic, "partition", "offset")
);
CREATE TABLE IF NOT EXISTS tombstones (user_id VARCHAR PRIMARY KEY, erased_at TIMESTAMPTZ NOT NULL);
"""
COLUMNS = ("event_id", "event_type", "ts", "user_id", "request_id", "ad_id", "campaign_id", "slot_id", "position",
           "model_version", "arm", "propensity", "device", "country", "source", "context", "value", "currency",
           "cost")  # fmt: skip
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
    "day": "strftime(date_trunc('day', i.ts AT TIME ZONE 'UTC'), '%Y-%m-%d')",
    "hour": "strftime(date_trunc('hour', i.ts AT TIME ZONE 'UTC'), '%Y-%m-%dT%H:00:00Z')",
}
# Activity level of a user: impressions in the queried range (the filters apply first).
ACTIVITY_SQL = "CASE WHEN count(*) >= 10 THEN 'heavy' WHEN count(*) >= 3 THEN 'medium' ELSE 'light' END"
# An impression's click (once: a repeated click has the same event id, and DISTINCT guards older logs) and
# its attributed conversions (several are possible: a user may buy twice after one click).
JOINED = """
    c AS (SELECT request_id, ad_id, max(cost) AS cost FROM events WHERE event_type = 'ad_click' GROUP BY 1, 2),
    v AS (SELECT request_id, ad_id, count(*) AS n, sum(coalesce(value, 0)) AS value FROM events
          WHERE event_type = 'conversion' AND request_id IS NOT NULL GROUP BY 1, 2)"""
JOIN = """LEFT JOIN c ON c.request_id = i.request_id AND c.ad_id = i.ad_id
          LEFT JOIN v ON v.request_id = i.request_id AND v.ad_id = i.ad_id"""
MEASURES = ("count(*) AS impressions", "count(c.request_id) AS clicks", "coalesce(sum(v.n), 0) AS conversions",
            "count(v.request_id) AS converted", "coalesce(sum(v.value), 0) AS revenue",
            "coalesce(sum(i.cost), 0) + coalesce(sum(c.cost), 0) AS spend")  # fmt: skip
EMPTY = {"impressions": 0, "clicks": 0, "conversions": 0, "converted": 0, "revenue": 0.0, "spend": 0.0}


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
        """Impressions, clicks, CTR, conversions (and impressions with one: `converted`), conversion rate,
        revenue, spend, CPA and ROAS per group (no group: one total row)."""
        unknown = [g for g in group_by if g not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown group_by {unknown}; choose from {', '.join(DIMENSIONS)}")
        where, params = _where(filters or Filters())
        keys = [f'{DIMENSIONS[g]} AS "{g}"' for g in group_by]
        select = ", ".join([*keys, *MEASURES])
        positions = ", ".join(str(i + 1) for i in range(len(group_by)))
        group = f"GROUP BY {positions} ORDER BY {positions}" if group_by else ""
        sql = f"""
            WITH i AS (SELECT * FROM events WHERE event_type = 'ad_impression' {where}), {JOINED},
            a AS (SELECT user_id, {ACTIVITY_SQL} AS activity FROM i GROUP BY user_id)
            SELECT {select}
            FROM i {JOIN}
                   JOIN a ON a.user_id = i.user_id
            {group}"""
        with self._connect(read_only=True) as db:
            cursor = db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        if not group_by and not rows[0]["impressions"]:
            rows = [dict(EMPTY)]
        return [_rates(row) for row in rows]

    def per_user(
        self, filters: Filters | None = None, measure: str = "clicks"
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """arm -> (impressions, `measure`) per user (clicks, converted or revenue): user-clustered intervals."""
        if measure not in ("clicks", "converted", "revenue"):
            raise ValueError(f"unknown measure {measure!r}")
        where, params = _where(filters or Filters())
        sql = f"""
            WITH i AS (SELECT * FROM events WHERE event_type = 'ad_impression' {where}), {JOINED}
            SELECT i.arm, i.user_id, {", ".join(MEASURES[:5])}
            FROM i {JOIN}
            GROUP BY 1, 2"""
        with self._connect(read_only=True) as db:
            cursor = db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        arms: dict[str, tuple[list[float], list[float]]] = {}
        for row in rows:
            counts = arms.setdefault(row["arm"], ([], []))
            counts[0].append(row["impressions"])
            counts[1].append(row[measure])
        return {arm: (np.array(n), np.array(y, dtype=float)) for arm, (n, y) in arms.items()}

    def lift(self, filters: Filters | None = None, confidence: float = 0.95) -> Lift:
        """Lift of targeted over control, with binomial and user-clustered intervals."""
        arms = {r["arm"]: r for r in self.outcomes(["arm"], filters)}
        t, c = arms.get("targeted", {}), arms.get("control", {})
        users = self.per_user(filters)
        empty = (np.zeros(0), np.zeros(0))
        return lift(t.get("clicks", 0), t.get("impressions", 0), c.get("clicks", 0), c.get("impressions", 0),
                    confidence, users=(users.get("targeted", empty), users.get("control", empty)))  # fmt: skip

    def money_lift(self, filters: Filters | None = None, confidence: float = 0.95) -> dict[str, Any]:
        """Targeted over control in conversion rate (impressions that converted; binomial and by user) and
        revenue per impression (users as units: the ratio estimator's cluster-robust interval)."""
        arms = {r["arm"]: r for r in self.outcomes(["arm"], filters)}
        t, c = arms.get("targeted", {}), arms.get("control", {})
        empty = (np.zeros(0), np.zeros(0))
        converted = self.per_user(filters, "converted")
        conversion = lift(t.get("converted", 0), t.get("impressions", 0), c.get("converted", 0),
                          c.get("impressions", 0), confidence,
                          users=(converted.get("targeted", empty), converted.get("control", empty)))  # fmt: skip
        revenue = self.per_user(filters, "revenue")
        by_user = clustered(revenue.get("targeted", empty), revenue.get("control", empty), confidence)
        per_impression = None
        if by_user is not None:
            rate = {arm: r["revenue"] / r["impressions"] if r.get("impressions") else None
                    for arm, r in (("targeted", t), ("control", c))}  # fmt: skip
            per_impression = {**rate, **by_user.as_dict(), "method": "ratio-estimator-delta-method-clustered-by-user"}
        return {"conversion_rate": conversion, "revenue_per_impression": per_impression}

    def unattributed(self, start: datetime | None = None, end: datetime | None = None) -> dict[str, Any]:
        """Conversions no click or impression could be credited with (by conversion time), and their value."""
        where, params = _where(Filters(start, end))
        sql = f"""SELECT count(*), coalesce(sum(value), 0) FROM events
                  WHERE event_type = 'conversion' AND request_id IS NULL {where}"""
        with self._connect(read_only=True) as db:
            n, value = db.execute(sql, params).fetchall()[0]
        return {"conversions": n, "revenue": float(value)}

    def spend(self, filters: Filters | None = None) -> list[dict[str, Any]]:
        """The ledger as landed: USD charged per campaign, UTC day (of the charge) and arm, from every event
        with a cost (CPM impressions, CPC clicks)."""
        where, params = _where(filters or Filters())
        sql = f"""
            SELECT coalesce(campaign_id, '(none)') AS campaign, strftime(ts AT TIME ZONE 'UTC', '%Y-%m-%d') AS day,
                   coalesce(arm, '(none)') AS arm, count(*) AS charges, sum(cost) AS spend
            FROM events WHERE cost IS NOT NULL {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
        with self._connect(read_only=True) as db:
            cursor = db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

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
            # IOException "Could not set lock": another process has it open; ConnectionException: this process has
            # it open in the other mode (an API serving reads while its thread writes, as in tests)
            except (duckdb.IOException, duckdb.ConnectionException) as error:
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
    types = {"ts": pa.timestamp("us", tz="UTC"), "position": pa.int32(), "propensity": pa.float64(),
             "value": pa.float64(), "cost": pa.float64()}  # fmt: skip
    return pa.table({name: pa.array([r[i] for r in rows], type=types.get(name, pa.string()))
                     for i, name in enumerate(COLUMNS)})  # fmt: skip


def _row(event: Event) -> list[Any]:
    context = event.context or {}
    return [
        event.event_id, event.event_type.value, event.ts, event.user_id, event.request_id, event.ad_id,
        event.campaign_id, event.slot_id, event.position, event.model_version, event.arm, event.propensity,
        _text(context.get("device")), _text(context.get("country")), event.source,
        json.dumps(context) if context else None, event.value, event.currency, event.cost,
    ]  # fmt: skip


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    """Add CTR, conversion rate, CPA (spend per conversion) and ROAS (revenue / spend) to a counts row."""
    n, spend = row["impressions"], float(row["spend"])
    row["revenue"], row["spend"] = float(row["revenue"]), spend
    row["ctr"] = row["clicks"] / n if n else None
    row["conversion_rate"] = row["converted"] / n if n else None
    row["cpa"] = spend / row["conversions"] if row["conversions"] else None
    row["roas"] = row["revenue"] / spend if spend else None
    return row


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
