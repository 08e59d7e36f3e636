"""Budgets and smooth pacing: spend counters per ad per UTC day, shared by replicas through Redis.

An ad may have spent at most `daily_budget x min(1, elapsed fraction of the day + slack)` by now,
so a budget spreads over the day instead of being gone by 9 am; it never spends past its budget.
Spend is the expected cost charged when the ad is served (pCTR x CPC bid, i.e. eCPM / 1000) or,
for OpenRTB, the clearing price from the billing notice.

Each process charges its in-memory counters at once (the request path never waits for Redis) and,
every `ADLOOP_PACING_SYNC_S` from a background thread (`Pacer.sync`), adds what it charged since to
the day's hash `adloop:spend:<day>` (field = ad id; HINCRBYFLOAT, expiring after two days) and reads
the whole hash back, in one script call: so uvicorn workers and replicas pace one budget together.
The read costs in proportion to the ads that spent today, not to the catalog: a sync holds the
serving process's GIL (commands and keys per ad cost 11-14 ms a second with 7,500 budgeted ads, one
script call 2.5-3.4 ms: `python -m bench.select_path`). Between syncs a process does not see the
others' spend: the overshoot is bounded by (replicas - 1) x spend rate x sync interval. Without Redis
each process paces alone (the runtime logs it), as a single process always does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from serving.catalog import Catalog

DAY_S = 86_400
KEY_TTL_S = 2 * DAY_S


# KEYS[1] = the day's hash; ARGV = ttl, then ad id, amount, ad id, amount, ...; returns HGETALL.
SYNC_SCRIPT = """
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
if #ARGV > 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('HGETALL', KEYS[1])
"""


def spend_key(day: int) -> str:
    """The hash of a UTC day's spend in USD, one field per ad id, shared by every serving process."""
    return f"adloop:spend:{day}"


class Pacer:
    def __init__(self, catalog: Catalog, *, slack: float = 0.05):
        self.slack = slack
        self._lock = threading.Lock()
        self._day = int(time.time() // DAY_S)
        self._catalog = catalog
        self._spend = np.zeros(len(catalog))  # USD today per catalog row: every replica's as last synced + ours since
        self._pending = np.zeros(len(catalog))  # ours since the last sync (not yet in Redis)

    def allowed(self, catalog: Catalog, now: float | None = None) -> np.ndarray:
        """(n,) bool: ads that may still spend now (unlimited budgets always may)."""
        now = time.time() if now is None else now
        self._roll(now)
        spend = self._spend if catalog is self._catalog else self.spend_for(catalog)
        fraction = min(1.0, (now % DAY_S) / DAY_S + self.slack)
        budget = catalog.daily_budget
        return (budget <= 0) | (spend < budget * fraction)

    def charge(self, catalog: Catalog, rows: np.ndarray, amounts: np.ndarray) -> None:
        if catalog is not self._catalog:
            return  # served from a catalog just replaced: its counters were carried over already
        with self._lock:
            np.add.at(self._spend, rows, amounts)
            np.add.at(self._pending, rows, amounts)

    def sync(self, client: Any) -> None:
        """Add this process's unsynced spend to the shared counters and read back every budgeted ad's total
        (one pipeline). On a Redis error the pending spend is kept for the next sync."""
        now = time.time()
        self._roll(now)
        with self._lock:
            catalog, day, pending = self._catalog, self._day, self._pending
            self._pending = np.zeros(len(catalog))
        rows = np.flatnonzero(pending)
        args: list[str | float] = [KEY_TTL_S]
        for row in rows:
            args += (catalog.ad_ids[row], float(pending[row]))
        try:
            flat = client.eval(SYNC_SCRIPT, 1, spend_key(day), *args)
        except Exception:
            with self._lock:
                if self._catalog is catalog and self._day == day:
                    self._pending += pending
            raise
        index = catalog.index
        shared = np.zeros(len(catalog))
        for ad_id, total in zip(flat[::2], flat[1::2], strict=True):
            row = index.get(ad_id.decode())
            if row is not None:
                shared[row] = float(total)
        budgeted = catalog.daily_budget > 0
        with self._lock:  # what was charged while we talked to Redis stays on top of the shared totals
            if self._catalog is catalog and self._day == day:
                self._spend[budgeted] = shared[budgeted] + self._pending[budgeted]

    def rebase(self, catalog: Catalog) -> None:
        """Carry today's spend over to a reloaded catalog (matched by ad_id)."""
        with self._lock:
            self._spend, self._pending, self._catalog = self.spend_for(catalog), self._carry(catalog), catalog

    def spend_for(self, catalog: Catalog) -> np.ndarray:
        return self._carry(catalog, self._spend)

    def _carry(self, catalog: Catalog, values: np.ndarray | None = None) -> np.ndarray:
        """Per-row values of the current catalog (default: the pending spend) on another catalog, by ad_id."""
        old, values = self._catalog, self._pending if values is None else values
        out = np.zeros(len(catalog))
        for ad_id, row in catalog.index.items():
            j = old.index.get(ad_id)
            if j is not None:
                out[row] = values[j]
        return out

    def spent(self, ad_id: str) -> float:
        row = self._catalog.index.get(ad_id)
        return 0.0 if row is None else float(self._spend[row])

    def _roll(self, now: float) -> None:
        day = int(now // DAY_S)
        if day != self._day:
            with self._lock:
                n = len(self._catalog)
                self._day, self._spend, self._pending = day, np.zeros(n), np.zeros(n)
