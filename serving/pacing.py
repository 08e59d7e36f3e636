"""Budgets and smooth pacing: in-process spend counters per ad per UTC day.

An ad may have spent at most `daily_budget x min(1, elapsed fraction of the day + slack)` by now,
so a budget spreads over the day instead of being gone by 9 am; it never spends past its budget.
Spend is the expected cost charged when the ad is served (pCTR x CPC bid, i.e. eCPM / 1000) or,
for OpenRTB, the clearing price from the billing notice.

Scope: one process. With several replicas (or uvicorn workers) each one paces its own share, so
the budget must then be divided by the replica count or — the intended production shape — kept in
Redis: `INCRBYFLOAT adloop:spend:<day>:<ad_id>` on serve and one `MGET` of the candidates' counters
per request (or a per-second local snapshot), with the key expiring after two days.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from serving.catalog import Catalog

DAY_S = 86_400


class Pacer:
    def __init__(self, catalog: Catalog, *, slack: float = 0.05):
        self.slack = slack
        self._lock = threading.Lock()
        self._day = int(time.time() // DAY_S)
        self._catalog = catalog
        self._spend = np.zeros(len(catalog))  # USD spent today, per catalog row

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

    def rebase(self, catalog: Catalog) -> None:
        """Carry today's spend over to a reloaded catalog (matched by ad_id)."""
        with self._lock:
            self._spend, self._catalog = self.spend_for(catalog), catalog

    def spend_for(self, catalog: Catalog) -> np.ndarray:
        old, spend = self._catalog, np.zeros(len(catalog))
        for ad_id, row in catalog.index.items():
            j = old.index.get(ad_id)
            if j is not None:
                spend[row] = self._spend[j]
        return spend

    def spent(self, ad_id: str) -> float:
        row = self._catalog.index.get(ad_id)
        return 0.0 if row is None else float(self._spend[row])

    def _roll(self, now: float) -> None:
        day = int(now // DAY_S)
        if day != self._day:
            with self._lock:
                self._day, self._spend = day, np.zeros(len(self._catalog))
