"""Pure state steps: events -> per-user and per-ad state -> the feature rows pushed to Feast.

No broker, no Redis here: `apply_user(state, event)` and `user_features(state)` are plain
functions over a dataclass, so they are tested (and recomputed in batch) without services.

Windows follow event time. A user's "now" is the latest event time seen for that user; a
window of length W counts the events whose bucket lies within W of now's bucket (5-minute
buckets for 1 h, hourly buckets for 24 h and 7 d). Late events (older than now) are counted
in their own bucket if it is still inside the longest window, else dropped from the windows
(they still count in the all-time totals). Ads use the same rule with the ad's latest time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import add
from typing import Any

from features.article_flow import SESSION_ITEMS
from streaming.events import DecodedEvent, Event, EventType

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
FINE_BUCKET_MS = 5 * MINUTE_MS  # buckets of the 1 h window
COARSE_BUCKET_MS = HOUR_MS  # buckets of the 24 h and 7 d windows
WINDOWS = {"1h": (FINE_BUCKET_MS, 12), "24h": (COARSE_BUCKET_MS, 24), "7d": (COARSE_BUCKET_MS, 168)}
EVENT_TYPES = [t.value for t in EventType]
RECENT_N = 20  # last items / categories kept for the embedding model
# Event ids remembered per user, for effect-once against repeats (a producer's retry, a file replayed
# twice): bounded per user instead of a key per event. A repeat of a forgotten id is caught by time: an
# unknown id before the newest forgotten one's time is `too_late` (dead-lettered, not applied). Not "at":
# a burst of events at one time (a MIND history, Taobao's whole seconds) is new, not a repeat.
RECENT_IDS_N = 64
TOP_CATEGORIES_N = 10
AFFINITY_HALF_LIFE_MS = 6 * HOUR_MS
AFFINITY_WEIGHTS = {"page_view": 1.0, "favorite": 2.0, "add_to_cart": 3.0, "purchase": 4.0, "ad_click": 2.0,
                    "conversion": 4.0, "search": 1.0}  # fmt: skip
# Beta prior of click rates: mean 5%, worth 20 impressions (smooths ads and users with few views).
CTR_PRIOR_CLICKS, CTR_PRIOR_IMPRESSIONS = 1.0, 20.0
CTR_PRIOR = CTR_PRIOR_CLICKS / CTR_PRIOR_IMPRESSIONS  # the click rate of an ad or user without data


def smoothed_ctr(clicks: int, impressions: int) -> float:
    return (clicks + CTR_PRIOR_CLICKS) / (impressions + CTR_PRIOR_IMPRESSIONS)


@dataclass
class UserState:
    """All a user's events reduce to this; JSON-serialisable (stored in Redis by the consumer)."""

    last_ts: int = 0  # ms, latest event time seen
    fine: dict[str, list[int]] = field(default_factory=dict)  # 5-min bucket -> counts per EVENT_TYPES
    coarse: dict[str, list[int]] = field(default_factory=dict)  # hour bucket -> counts per EVENT_TYPES
    affinity: dict[str, float] = field(default_factory=dict)  # category -> decayed score as of last_ts
    recent_items: list[str] = field(default_factory=list)  # newest last
    recent_categories: list[str] = field(default_factory=list)
    ad_hours: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # ad -> hour -> [impressions, clicks]
    campaign_hours: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    impressions_total: int = 0
    clicks_total: int = 0
    recent_ids: list[list[Any]] = field(default_factory=list)  # [event id, ms] of the last RECENT_IDS_N applied
    forgot_until: int = 0  # ms: the latest time of a forgotten id (repeats before it cannot be told apart)
    session_id: str | None = None  # the session of the latest page view that named one
    session_items: list[str] = field(default_factory=list)  # its last SESSION_ITEMS clicks, newest last
    session_length: int = 0  # its clicks so far
    session_last_ms: int = 0  # its latest click

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)  # fields hold only JSON types (dataclasses.asdict deep-copies: 10x slower)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UserState:
        return cls(**data)


def repeat_of(state: UserState, event: Event | DecodedEvent) -> str | None:
    """Why the event must not be applied again: "duplicate" (its id was applied), "too_late" (before
    the time of an id forgotten since, so it may be one), or None (new)."""
    if any(seen == event.event_id for seen, _ in state.recent_ids):
        return "duplicate"
    if event.ts_ms < state.forgot_until:
        return "too_late"
    return None


def remember(state: UserState, event: Event | DecodedEvent) -> None:
    """Record an applied event's id (`repeat_of` then knows it); forgets the oldest beyond RECENT_IDS_N."""
    state.recent_ids.append([event.event_id, event.ts_ms])
    if len(state.recent_ids) > RECENT_IDS_N:
        _, ts = state.recent_ids.pop(0)
        state.forgot_until = max(state.forgot_until, ts)


def session_before(state: UserState, event: Event | DecodedEvent) -> list[str] | None:
    """The earlier clicks (newest last) of the session this event is a click of, before it; None when the
    event is not a click within a session (a page view of an item that names its session)."""
    if event.event_type is not EventType.page_view or not event.item_id or not event.session_id:
        return None
    return list(state.session_items) if event.session_id == state.session_id else []


def apply_user(state: UserState, event: Event | DecodedEvent) -> UserState:
    """Fold one event into the user's state (mutates and returns it)."""
    ts, kind = event.ts_ms, event.event_type.value
    if ts > state.last_ts:
        _decay(state.affinity, ts - state.last_ts if state.last_ts else 0)
        state.last_ts = ts
    horizon = _bucket(state.last_ts, COARSE_BUCKET_MS) - WINDOWS["7d"][1]
    in_horizon = _bucket(ts, COARSE_BUCKET_MS) > horizon
    if in_horizon:
        _count(state.fine, _bucket(ts, FINE_BUCKET_MS), kind)
        _count(state.coarse, _bucket(ts, COARSE_BUCKET_MS), kind)
    if event.category and kind in AFFINITY_WEIGHTS:
        weight = AFFINITY_WEIGHTS[kind] * 0.5 ** ((state.last_ts - ts) / AFFINITY_HALF_LIFE_MS)
        state.affinity[event.category] = state.affinity.get(event.category, 0.0) + weight
    if kind not in ("ad_impression", "ad_click", "conversion"):
        if event.item_id:
            state.recent_items = [*state.recent_items, event.item_id][-RECENT_N:]
        if event.category:
            state.recent_categories = [*state.recent_categories, event.category][-RECENT_N:]
        if kind == "page_view" and event.item_id and event.session_id:
            if event.session_id != state.session_id:
                state.session_id, state.session_items, state.session_length, state.session_last_ms = (
                    event.session_id, [], 0, 0)  # fmt: skip
            state.session_items = [*state.session_items, event.item_id][-SESSION_ITEMS:]
            state.session_length += 1
            state.session_last_ms = max(state.session_last_ms, ts)
    if kind in ("ad_impression", "ad_click"):
        slot = 0 if kind == "ad_impression" else 1
        state.impressions_total += slot == 0
        state.clicks_total += slot == 1
        hour = str(_bucket(ts, COARSE_BUCKET_MS))
        for table, key in ((state.ad_hours, event.ad_id), (state.campaign_hours, event.campaign_id)):
            if key and in_horizon:
                table.setdefault(key, {}).setdefault(hour, [0, 0])[slot] += 1
    return state


def user_features(state: UserState) -> dict[str, Any]:
    """The `user_activity` feature row of this state (names match features/repo)."""
    row: dict[str, Any] = {}
    for window, (size, count) in WINDOWS.items():
        buckets = state.fine if size == FINE_BUCKET_MS else state.coarse
        totals = _window_sum(buckets, _bucket(state.last_ts, size), count, len(EVENT_TYPES))
        row.update(zip(_WINDOW_NAMES[window], totals, strict=True))
    top = sorted(state.affinity.items(), key=_by_score)[:TOP_CATEGORIES_N]
    row["top_categories"] = [c for c, _ in top]
    row["top_category_scores"] = [s for _, s in top]
    row["recent_items"] = list(state.recent_items)
    row["recent_categories"] = list(state.recent_categories)
    hour = _bucket(state.last_ts, COARSE_BUCKET_MS)
    for (ids, impressions, clicks), table in zip(_FREQ_NAMES, (state.ad_hours, state.campaign_hours), strict=True):
        if not table:  # most users never saw an ad
            row[ids], row[impressions], row[clicks] = [], [], []
            continue
        sums = [(i, _window_sum(hours, hour, 24, 2)) for i, hours in sorted(table.items())]
        sums = [(i, s) for i, s in sums if s[0] or s[1]]
        row[ids] = [i for i, _ in sums]
        row[impressions] = [s[0] for _, s in sums]
        row[clicks] = [s[1] for _, s in sums]
    row["impressions_total"] = state.impressions_total
    row["clicks_total"] = state.clicks_total
    row["user_ctr"] = smoothed_ctr(state.clicks_total, state.impressions_total)
    row["last_seen_ms"] = state.last_ts
    row["session_id"] = state.session_id
    row["session_items"] = list(state.session_items)
    row["session_length"] = state.session_length
    row["session_last_ms"] = state.session_last_ms
    return row


def _ad_feature_names() -> tuple[str, ...]:
    windows = tuple(f"ad_{count}_{window}" for window in WINDOWS for count in ("impressions", "clicks"))
    return (*windows, "ad_ctr_24h", "ad_ctr_7d", "ad_last_seen_ms")


_WINDOW_NAMES = {window: tuple(f"{kind}_{window}" for kind in EVENT_TYPES) for window in WINDOWS}
_FREQ_NAMES = [(f"freq_{p}_ids", f"freq_{p}_impressions_24h", f"freq_{p}_clicks_24h") for p in ("ad", "campaign")]


# The `ad_performance` row's features, in the order of its Feast view (features/repo).
AD_FEATURES = _ad_feature_names()


def _by_score(item: tuple[str, float]) -> tuple[float, str]:
    return -item[1], item[0]


def ad_features(hours: dict[str, list[int]], fine: dict[str, list[int]], last_ts: int) -> dict[str, Any]:
    """The `ad_performance` row from an ad's hourly and 5-minute [impressions, clicks] counters."""
    row: dict[str, Any] = {}
    for window, (size, count) in WINDOWS.items():
        buckets = fine if size == FINE_BUCKET_MS else hours
        impressions, clicks = _window_sum(buckets, _bucket(last_ts, size), count, 2)
        row[f"ad_impressions_{window}"] = impressions
        row[f"ad_clicks_{window}"] = clicks
    row["ad_ctr_24h"] = smoothed_ctr(row["ad_clicks_24h"], row["ad_impressions_24h"])
    row["ad_ctr_7d"] = smoothed_ctr(row["ad_clicks_7d"], row["ad_impressions_7d"])
    row["ad_last_seen_ms"] = last_ts
    return row


def stale_ad_counters(hours: dict[str, list[int]], fine: dict[str, list[int]], last_ts: int) -> list[str]:
    """Counter fields (`h:<bucket>:<slot>`, `f:<bucket>:<slot>`) outside every window: safe to delete."""
    hour_floor = _bucket(last_ts, COARSE_BUCKET_MS) - WINDOWS["7d"][1]
    fine_floor = _bucket(last_ts, FINE_BUCKET_MS) - WINDOWS["1h"][1]
    stale = [f"h:{b}:{slot}" for b in hours if int(b) <= hour_floor for slot in (0, 1)]  # ad_counter_fields' format
    return stale + [f"f:{b}:{slot}" for b in fine if int(b) <= fine_floor for slot in (0, 1)]


def ad_counter_fields(event: Event | DecodedEvent) -> tuple[str, str] | None:
    """The two counter fields an ad impression or click increments in its ad's hash (None for other events):
    `h:<hour bucket>:<slot>` and `f:<5-minute bucket>:<slot>`, slot 0 = impressions, 1 = clicks."""
    if event.event_type not in (EventType.ad_impression, EventType.ad_click):
        return None
    slot = 0 if event.event_type == EventType.ad_impression else 1
    ts = event.ts_ms
    return f"h:{_bucket(ts, COARSE_BUCKET_MS)}:{slot}", f"f:{_bucket(ts, FINE_BUCKET_MS)}:{slot}"


def add_counter(hours: dict[str, list[int]], fine: dict[str, list[int]], name: str, amount: int) -> None:
    """Add `amount` to the counter a field name (`ad_counter_fields`' format) stands for."""
    kind, bucket, slot = name.split(":")
    (hours if kind == "h" else fine).setdefault(bucket, [0, 0])[int(slot)] += amount


# --- helpers ------------------------------------------------------------------------------


def _bucket(ts: int, size: int) -> int:
    return ts // size


def _count(buckets: dict[str, list[int]], bucket: int, kind: str) -> None:
    counts = buckets.setdefault(str(bucket), [0] * len(EVENT_TYPES))
    counts[EVENT_TYPES.index(kind)] += 1


def _window_sum(buckets: dict[str, list[int]], now_bucket: int, count: int, width: int) -> list[int]:
    """Element-wise sum of the buckets in (now_bucket - count, now_bucket]."""
    total: list[int] | None = None
    low = now_bucket - count
    for key, values in buckets.items():
        if low < int(key) <= now_bucket:
            total = list(values) if total is None else list(map(add, total, values))
    return [0] * width if total is None else total


def _decay(scores: dict[str, float], elapsed_ms: int) -> None:
    if elapsed_ms <= 0 or not scores:
        return
    factor = 0.5 ** (elapsed_ms / AFFINITY_HALF_LIFE_MS)
    for key in scores:
        scores[key] *= factor


def prune(state: UserState) -> UserState:
    """Drop buckets that can no longer fall inside any window (once per batch, before storing)."""
    fine_floor = _bucket(state.last_ts, FINE_BUCKET_MS) - WINDOWS["1h"][1]
    coarse_floor = _bucket(state.last_ts, COARSE_BUCKET_MS) - WINDOWS["7d"][1]
    day_floor = _bucket(state.last_ts, COARSE_BUCKET_MS) - WINDOWS["24h"][1]
    state.fine = {k: v for k, v in state.fine.items() if int(k) > fine_floor}
    state.coarse = {k: v for k, v in state.coarse.items() if int(k) > coarse_floor}
    for table in (state.ad_hours, state.campaign_hours):
        for key in list(table):
            table[key] = {h: c for h, c in table[key].items() if int(h) > day_floor}
            if not table[key]:
                del table[key]
    return state
