"""Budgets and smooth pacing: the spend ledger per ad per UTC day and over all time, shared by replicas
through Redis.

An ad, and a campaign (its ads together), may have spent at most `daily budget x min(1, elapsed
fraction of the day + slack)` by now, so a budget spreads over the day instead of being gone by 9 am;
a campaign's lifetime budget is a hard cap. Spend is what was actually charged, by the ad's pricing
model (`serving.charges`): a CPM ad when its impression is logged (its CPM bid / 1000, or the
clearing price of the OpenRTB billing notice), a CPC ad when its tracked click arrives (its bid).

Each process charges its in-memory counters at once (the request path never waits for Redis) and,
every `ADLOOP_PACING_SYNC_S` from a background thread (`Pacer.sync`), adds what it charged since to
the day's hash `adloop:{spend}:<day>` (field = ad id; HINCRBYFLOAT, expiring after two days) and to the
lifetime hash `adloop:{spend}:lifetime`, and reads both back, in one script call: so uvicorn workers and
replicas pace one budget together. On Redis Cluster a script's keys must share a hash slot: the `{spend}`
tag puts both hashes on one slot (one node). That is no hot spot: each process calls the script once per
sync interval, and the hashes hold one field per ad that spent.
The read costs in proportion to the ads that spent today, not to the catalog: a sync holds the
serving process's GIL (commands and keys per ad cost 11-14 ms a second with 7,500 budgeted ads, one
script call 2.5-3.4 ms: `python -m bench.select_path`). Between syncs a process does not see the
others' spend: the overshoot is bounded by (replicas - 1) x spend rate x sync interval, and a campaign
that ran out on one replica stops on the others within two sync intervals. Without Redis
each process paces alone (the runtime logs it), as a single process always does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.catalog import Catalog

DAY_S = 86_400
KEY_TTL_S = 2 * DAY_S
SPEND_TAG = "adloop:{spend}:"  # the hash tag: one slot for the day's and the lifetime hash (one script call)
LIFETIME_KEY = SPEND_TAG + "lifetime"  # field = ad id, USD charged since the ad's first charge; kept for good
SLICE_ROWS = 1 << 17  # rows a recompute handles between two chances for a waiting request to take the GIL
STALE_RECHECKS = 5  # kept masks this many `recheck_s` old are recomputed by the request (the thread is gone)


# KEYS[1] = the day's hash, KEYS[2] = the lifetime hash; ARGV = ttl, then ad id, amount, ...;
# returns {HGETALL day, HGETALL lifetime}.
SYNC_SCRIPT = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
end
if #ARGV > 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""

LEGACY_PREFIX = "adloop:spend:"  # the hashes' names before the hash tag (standalone only: a cluster refused them)

# KEYS[1] = a hash of the old name, KEYS[2] = its new name; ARGV[1] = the expiry to give the new one if it has
# none (0: none). Adds every field of the old to the new, drops the old; returns the fields merged.
MERGE_SCRIPT = """
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do redis.call('HINCRBYFLOAT', KEYS[2], flat[i], flat[i + 1]) end
if #flat > 0 and tonumber(ARGV[1]) > 0 and redis.call('TTL', KEYS[2]) < 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[1])
return #flat / 2
"""


def adopt_legacy_spend(client: Any, day: int) -> int:
    """Merge what a serving version from before the `{spend}` tag recorded (`adloop:spend:<day>`,
    `adloop:spend:lifetime`) into the tagged hashes, so an upgrade neither forgets today's spend nor resets
    lifetime budgets. Each process
    runs it once at start on standalone Redis; spend an old replica records later, during a rolling upgrade, is
    merged by the next process to start. Returns the fields merged."""
    merged = client.eval(MERGE_SCRIPT, 2, LEGACY_PREFIX + "lifetime", LIFETIME_KEY, 0)
    return int(merged) + int(client.eval(MERGE_SCRIPT, 2, f"{LEGACY_PREFIX}{day}", spend_key(day), KEY_TTL_S))


def spend_key(day: int) -> str:
    """The hash of a UTC day's spend in USD, one field per ad id, shared by every serving process."""
    return f"{SPEND_TAG}{day}"


class Pacer:
    """`allowed` is asked per request and a full check costs O(catalog) (~10 ms over a million ads), so its
    mask is kept and recomputed at most every `recheck_s`, or at once after a rebase or a new day. A charge
    re-checks only the ads and campaigns it charged and blocks those that reached their budget in the kept
    mask at once: the mask never lets an ad spend past what a full recompute allows; an ad whose allowance
    grew with the day waits at most `recheck_s` to be allowed again.

    With `background=True` the recompute is `recheck`'s, called by the serving process's pacing thread
    (after each sync and every `recheck_s`), never a request's: a request that paid it waited ~10 ms once a
    second, the p99 of a million-ad catalog at 100 requests/s. `recheck` works in slices of rows, so a
    request waits for the GIL behind at most one slice; the request path recomputes only while no mask is
    kept or the kept one is `STALE_RECHECKS` rechecks old (the thread is gone)."""

    def __init__(self, catalog: Catalog, *, slack: float = 0.05, recheck_s: float = 1.0, background: bool = False):
        self.slack = slack
        self.recheck_s = recheck_s
        self.background = background
        self._allowed: _Allowed | None = None  # the kept mask (`allowed`)
        self._charged_since: list[tuple[np.ndarray, np.ndarray]] | None = None  # during `recheck`'s compute
        self._lock = threading.Lock()
        self._day = int(time.time() // DAY_S)
        self._catalog = catalog
        self._spend = np.zeros(len(catalog))  # USD today per catalog row: every replica's as last synced + ours since
        self._pending = np.zeros(len(catalog))  # ours since the last sync (not yet in Redis)
        self._lifetime = np.zeros(len(catalog))  # USD ever, as last synced + ours since

    def allowed(self, catalog: Catalog, now: float | None = None) -> np.ndarray:
        """(n,) bool: ads that may still spend now, by their own and their campaign's budgets (unlimited
        budgets always may). Read-only: the kept mask itself."""
        now = time.time() if now is None else now
        self._roll(now)
        kept = self._allowed
        max_age = self.recheck_s * (STALE_RECHECKS if self.background else 1)
        if kept is not None and kept.catalog is catalog and 0 <= now - kept.at < max_age:
            return kept.mask
        with self._lock:  # no charge between reading the spend and keeping the sums made from it
            if catalog is self._catalog:
                self._allowed = kept = self._compute(catalog, self._spend, self._lifetime, now)
                return kept.mask
        # a request on a catalog just replaced (a reload in between): its carried counters, not kept
        return self._compute(catalog, self.spend_for(catalog), self._carry(catalog, self._lifetime), now).mask

    def recheck(self, now: float | None = None) -> None:
        """Recompute the kept mask off the request path (`background`): from a copy of the counters, with the
        charges made meanwhile applied to it before it is kept, so it equals a full recompute at its moment."""
        now = time.time() if now is None else now
        self._roll(now)
        with self._lock:
            catalog, day = self._catalog, self._day
            spend, lifetime = self._spend.copy(), self._lifetime.copy()
            self._charged_since = []
        try:
            computed = self._compute(catalog, spend, lifetime, now)
        except BaseException:
            self._charged_since = None
            raise
        with self._lock:
            charged, self._charged_since = self._charged_since or [], None
            if self._catalog is catalog and self._day == day:
                for rows, amounts in charged:
                    computed.charge(rows, amounts, self._spend)
                self._allowed = computed

    def _compute(self, catalog: Catalog, spend: np.ndarray, lifetime: np.ndarray, now: float) -> _Allowed:
        fraction = min(1.0, (now % DAY_S) / DAY_S + self.slack)
        n_campaigns = len(catalog.campaign_ids)
        campaign_day, campaign_ever = np.zeros(n_campaigns), np.zeros(n_campaigns)
        for part in _slices(len(catalog)):  # a slice at a time: a waiting request gets the GIL in between
            codes = catalog.campaign_code[part]
            campaign_day += np.bincount(codes, spend[part], minlength=n_campaigns)
            campaign_ever += np.bincount(codes, lifetime[part], minlength=n_campaigns)
        daily, ever = catalog.campaign_daily, catalog.campaign_lifetime
        campaign_ok = ((daily <= 0) | (campaign_day < daily * fraction)) & ((ever <= 0) | (campaign_ever < ever))
        mask = np.empty(len(catalog), dtype=bool)
        for part in _slices(len(catalog)):
            budget = catalog.daily_budget[part]
            mask[part] = ((budget <= 0) | (spend[part] < budget * fraction)) & campaign_ok[catalog.campaign_code[part]]
        return _Allowed(catalog, now, fraction, mask, campaign_day, campaign_ever, ~campaign_ok)

    def charge(self, catalog: Catalog, rows: np.ndarray, amounts: np.ndarray) -> None:
        if catalog is not self._catalog:
            return  # served from a catalog just replaced: its counters were carried over already
        with self._lock:
            np.add.at(self._spend, rows, amounts)
            np.add.at(self._pending, rows, amounts)
            np.add.at(self._lifetime, rows, amounts)
            if self._charged_since is not None:
                self._charged_since.append((rows, amounts))
            kept = self._allowed
            if kept is not None and kept.catalog is catalog:
                kept.charge(rows, amounts, self._spend)

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
            today, ever = client.eval(SYNC_SCRIPT, 2, spend_key(day), LIFETIME_KEY, *args)
        except Exception:
            with self._lock:
                if self._catalog is catalog and self._day == day:
                    self._pending += pending
            raise
        shared, shared_ever = _per_row(catalog, today), _per_row(catalog, ever)
        with self._lock:  # what was charged while we talked to Redis stays on top of the shared totals
            if self._catalog is catalog and self._day == day:
                self._spend = shared + self._pending
                self._lifetime = shared_ever + self._pending
                if not self.background:
                    self._allowed = None  # other processes' spend: the next request recomputes
        if self.background:
            self.recheck()  # other processes' spend, in the syncing thread

    def rebase(self, catalog: Catalog) -> None:
        """Carry today's spend over to a reloaded catalog (matched by ad_id)."""
        with self._lock:
            spend, lifetime, pending = (
                self.spend_for(catalog),
                self._carry(catalog, self._lifetime),
                self._carry(catalog),
            )
            self._spend, self._lifetime, self._pending, self._catalog = spend, lifetime, pending, catalog
            self._allowed = None

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

    def campaign_spent(self, campaign_id: str) -> tuple[float, float]:
        """(today, lifetime) USD of a campaign's ads, as this process sees them."""
        code = self._catalog.campaign_index.get(campaign_id)
        if code is None:
            return 0.0, 0.0
        rows = self._catalog.campaign_code == code
        return float(self._spend[rows].sum()), float(self._lifetime[rows].sum())

    def _roll(self, now: float) -> None:
        day = int(now // DAY_S)
        if day != self._day:
            with self._lock:
                n = len(self._catalog)
                self._day, self._spend, self._pending = day, np.zeros(n), np.zeros(n)
                self._allowed = None


@dataclass
class _Allowed:
    """`Pacer.allowed`'s kept mask and what it was computed from; charges keep the campaign sums current
    (under the pacer's lock) and replace the mask, which readers hold without the lock."""

    catalog: Catalog
    at: float  # when it was computed (unix s)
    fraction: float  # the day's allowance then
    mask: np.ndarray  # (n,) bool, never changed in place
    campaign_day: np.ndarray  # (campaigns,) USD today
    campaign_ever: np.ndarray  # (campaigns,) USD ever
    campaign_blocked: np.ndarray  # (campaigns,) bool: every ad of the campaign is out of the mask

    def charge(self, rows: np.ndarray, amounts: np.ndarray, spend: np.ndarray) -> None:
        """Re-check the charged ads and their campaigns at the mask's own allowance; block those now over."""
        catalog = self.catalog
        codes = catalog.campaign_code[rows]
        np.add.at(self.campaign_day, codes, amounts)
        np.add.at(self.campaign_ever, codes, amounts)
        budget = catalog.daily_budget[rows]
        over_ads = rows[(budget > 0) & (spend[rows] >= budget * self.fraction) & self.mask[rows]]
        daily, ever = catalog.campaign_daily[codes], catalog.campaign_lifetime[codes]
        over = ((daily > 0) & (self.campaign_day[codes] >= daily * self.fraction)) | (
            (ever > 0) & (self.campaign_ever[codes] >= ever)
        )
        over_campaigns = np.unique(codes[over & ~self.campaign_blocked[codes]])
        if not len(over_ads) and not len(over_campaigns):
            return
        mask = self.mask.copy()
        mask[over_ads] = False
        if len(over_campaigns):
            mask[np.isin(catalog.campaign_code, over_campaigns)] = False
            self.campaign_blocked[over_campaigns] = True
        self.mask = mask


def _slices(n: int) -> list[slice]:
    return [slice(start, start + SLICE_ROWS) for start in range(0, n, SLICE_ROWS)]


def _per_row(catalog: Catalog, flat: list[bytes]) -> np.ndarray:
    """An HGETALL reply (ad id, amount, ...) as per-row amounts of `catalog` (unknown ads left out)."""
    out = np.zeros(len(catalog))
    for ad_id, total in zip(flat[::2], flat[1::2], strict=True):
        row = catalog.index.get(ad_id.decode())
        if row is not None:
            out[row] = float(total)
    return out
