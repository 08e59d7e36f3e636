"""MIND as a prequential stream of ad-slot requests: one impression row per candidate, features as of before it.

Each MIND impression is replayed as a request (its candidate list), scored with the state that
strictly earlier events built, and only then revealed: an `ad_impression` per candidate, an
`ad_click` plus a `page_view` of the article per click (the click opens the article), 1 s later.
Impressions that share a timestamp are all featurised before any of them is revealed. These are the
events `adloop replay --format mind` sends through Kafka (`streaming.replay.mind`), in the same order,
so the features here are those the consumer builds (tests/models/test_prequential.py checks it).

User features come from `features.aggregates` (`apply_user` / `user_features`, the consumer's own
code); ad features from `ad_features` over per-ad hourly and 5-minute counters, as the consumer keeps
them. A user's MIND `history` (articles clicked before the data window) is folded in as `page_view`
events 1 ms apart, ending 1 ms before the user's first impression.

MIND has no campaigns: an article's subcategory stands in as its `campaign_id` (so the per-campaign
frequency counters mean "this user's impressions of this subcategory").
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from features.aggregates import (
    FINE_BUCKET_MS,
    WINDOWS,
    UserState,
    ad_counter_fields,
    ad_features,
    add_counter,
    apply_user,
    user_features,
)
from streaming.events import Event, EventType
from streaming.replay.mind import CLICK_DELAY, read_news, read_rows

CLICK_DELAY_MS = int(CLICK_DELAY.total_seconds() * 1000)


@dataclass
class Impression:
    request_id: str
    user_id: str
    ts_ms: int
    history: list[str]
    ad_ids: list[str]
    labels: list[int]


@dataclass
class AdCounters:
    """One ad's counters as the consumer keeps them: [impressions, clicks] per hour and per 5 minutes."""

    hours: dict[str, list[int]] = field(default_factory=dict)
    fine: dict[str, list[int]] = field(default_factory=dict)
    last_ts: int = 0


def read_behaviors(path: Path, limit: int | None = None) -> list[Impression]:
    """behaviors.tsv as impressions in time order (ties keep file order), read by the replay's reader."""
    rows = sorted(read_rows(path), key=lambda row: (row.ts, row.line))
    impressions = [
        Impression(
            request_id=row.impression_id,
            user_id=row.user_id,
            ts_ms=round(row.ts.timestamp() * 1000),
            history=row.history,
            ad_ids=[news_id for news_id, _ in row.candidates],
            labels=[int(clicked) for _, clicked in row.candidates],
        )
        for row in rows
    ]
    return impressions[:limit] if limit else impressions


def impression_frame(data_dir: str | Path, limit: int | None = None) -> pd.DataFrame:
    """The prequential impression rows of a MIND folder (behaviors.tsv, news.tsv), in time order."""
    data_dir = Path(data_dir)
    replay = Replay(read_news(data_dir / "news.tsv"))
    return replay.run(read_behaviors(data_dir / "behaviors.tsv", limit))


class Replay:
    """Featurise-then-reveal over impressions; holds the users' and ads' state between them."""

    def __init__(self, news: dict[str, tuple[str, str]]) -> None:
        self.news = news
        self.users: dict[str, UserState] = {}
        self.ads: dict[str, AdCounters] = {}
        self._last_ms = 0  # the previous impression's time: a new user's history is not placed before it

    def attributes(self, ad_id: str) -> tuple[str | None, str | None]:
        """(category, campaign_id) of an article; None where news.tsv has no row for it."""
        category, subcategory = self.news.get(ad_id, (None, None))
        return category, (f"sub:{subcategory}" if subcategory else None)

    def run(self, impressions: list[Impression]) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        clicks: list[tuple[int, int, Impression]] = []  # (due ms, order, impression): revealed clicks not yet due
        start = 0
        while start < len(impressions):
            end = start
            while end < len(impressions) and impressions[end].ts_ms == impressions[start].ts_ms:
                end += 1
            batch = impressions[start:end]
            self._click(clicks, until_ms=batch[0].ts_ms)
            for imp in batch:  # all featurised before any is revealed
                rows.extend(self.featurise(imp))
            for order, imp in enumerate(batch, start=start):
                self.reveal(imp)
                heapq.heappush(clicks, (imp.ts_ms + CLICK_DELAY_MS, order, imp))
            start = end
        self._click(clicks, until_ms=None)
        return pd.DataFrame(rows)

    def featurise(self, imp: Impression) -> list[dict[str, Any]]:
        if imp.user_id not in self.users:
            state = self.users[imp.user_id] = UserState()
            n = len(imp.history)
            for index, item in enumerate(imp.history):  # 1 ms apart, never before the previous impression
                ts_ms = max(self._last_ms, imp.ts_ms - (n - index))
                self._apply(state, EventType.page_view, ts_ms, item_id=item, category=self.attributes(item)[0])
        self._last_ms = imp.ts_ms
        user = user_features(self.users[imp.user_id])
        hour = datetime.fromtimestamp(imp.ts_ms / 1000, tz=UTC).hour
        rows = []
        for position, (ad_id, label) in enumerate(zip(imp.ad_ids, imp.labels, strict=True), start=1):
            category, campaign = self.attributes(ad_id)
            counters = self.ads.get(ad_id) or AdCounters()
            rows.append({"request_id": imp.request_id, "user_id": imp.user_id, "ad_id": ad_id, "ts": imp.ts_ms,
                         "label": label, "position": position, "slate_size": len(imp.ad_ids), "hour": hour,
                         "category": category, "campaign_id": campaign, "advertiser_id": None, **user,
                         **ad_features(counters.hours, counters.fine, counters.last_ts)})  # fmt: skip
        return rows

    def reveal(self, imp: Impression) -> None:
        """The impression's `ad_impression` events (its clicks come 1 s later: `run` applies them when due)."""
        state = self.users[imp.user_id]
        for ad_id in imp.ad_ids:
            category, campaign = self.attributes(ad_id)
            ad = dict(ad_id=ad_id, campaign_id=campaign, category=category, request_id=imp.request_id)
            self._count_ad(self._apply(state, EventType.ad_impression, imp.ts_ms, **ad))

    def _click(self, due: list[tuple[int, int, Impression]], *, until_ms: int | None) -> None:
        """Apply the clicks due by `until_ms` (all if None), oldest first: an `ad_click` and a `page_view` of
        the article per click, as `streaming.replay.mind` sends them (a click at a request's very time is seen)."""
        while due and (until_ms is None or due[0][0] <= until_ms):
            click_ms, _, imp = heapq.heappop(due)
            state = self.users[imp.user_id]
            for ad_id, label in zip(imp.ad_ids, imp.labels, strict=True):
                if label:
                    category, campaign = self.attributes(ad_id)
                    ad = dict(ad_id=ad_id, campaign_id=campaign, category=category, request_id=imp.request_id)
                    self._count_ad(self._apply(state, EventType.ad_click, click_ms, **ad))
                    self._apply(state, EventType.page_view, click_ms, item_id=ad_id, category=category)

    def _apply(self, state: UserState, kind: EventType, ts_ms: int, **fields: Any) -> Event:
        # model_construct skips validation: the replay builds every field itself, with the contract's types.
        ts = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
        event = Event.model_construct(event_type=kind, ts=ts, **fields)
        apply_user(state, event)
        return event

    def _count_ad(self, event: Event) -> None:
        counters = ad_counter_fields(event)
        if counters is None:
            return
        ad = self.ads.setdefault(event.ad_id, AdCounters())
        for counter in counters:
            add_counter(ad.hours, ad.fine, counter, 1)
        ad.last_ts = max(ad.last_ts, event.ts_ms)
        # Buckets that no window can reach any more: dropped, as the consumer prunes them.
        floor = ad.last_ts // FINE_BUCKET_MS - WINDOWS["1h"][1]
        if len(ad.fine) > WINDOWS["1h"][1] + 1:
            ad.fine = {k: v for k, v in ad.fine.items() if int(k) > floor}
