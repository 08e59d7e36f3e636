"""`GET /v1/outcomes`: impressions, clicks, CTR and conversions from the outcomes store (DuckDB, history),
with the lift of targeting over control; `GET /v1/outcomes/live`: the last hour and day from the feature
consumer's ad counters in Redis (seconds old)."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status

from models.estimators import wilson
from outcomes.store import DIMENSIONS, Filters, OutcomeStore
from serving.deps import RuntimeDep, SettingsDep
from serving.http import JSONRoute

router = APIRouter(prefix="/v1", tags=["outcomes"], route_class=JSONRoute)
_DIMENSION = "|".join(sorted(DIMENSIONS, key=len, reverse=True))
GROUP_BY = f"^({_DIMENSION})(,({_DIMENSION}))*$"  # the schema states the choices (a comma-separated list)
# RFC 3339 date-times only: pydantic's datetime would also take a number of seconds ("0.5") or a bare date.
RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:[Zz]|([+-])(\d{2}):(\d{2}))", re.ASCII
)
DATE_TIME = {"format": "date-time"}


def _instant(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 query value as a UTC datetime. Year 0 and leap second 60, valid in RFC 3339 but not in
    Python, are read as year 1 and second 59; bounds beyond Python's range are clamped to it."""
    if value is None:
        return None
    match = RFC3339.fullmatch(value)
    try:
        if match is None:
            raise ValueError("expected e.g. 2026-12-02T10:00:00Z")
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        micros = int(((match[7] or ".0")[1:] + "000000")[:6])
        offset = timedelta(hours=int(match[9] or 0), minutes=int(match[10] or 0)) * (-1 if match[8] == "-" else 1)
        if offset >= timedelta(days=1) or hour > 23 or minute > 59 or second > 60:
            raise ValueError("time out of range")
        local = datetime(max(year, 1), month, day, hour, minute, min(second, 59), micros)
    except ValueError as error:
        detail = [{"loc": ["query", name], "msg": f"not an RFC 3339 date-time: {error}", "type": "datetime_parsing"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
    try:
        return (local - offset).replace(tzinfo=UTC)
    except OverflowError:
        return (datetime.min if offset > timedelta(0) else datetime.max).replace(tzinfo=UTC)


@router.get("/outcomes")
def outcomes(
    settings: SettingsDep,
    from_: Annotated[
        str | None, Query(alias="from", json_schema_extra=DATE_TIME, description="Impressions at or after (RFC 3339).")
    ] = None,
    to: Annotated[str | None, Query(json_schema_extra=DATE_TIME, description="Impressions before (RFC 3339).")] = None,
    ad_id: str | None = None,
    campaign_id: str | None = None,
    arm: Literal["targeted", "control"] | None = None,
    model_version: str | None = None,
    group_by: Annotated[
        str | None,
        Query(pattern=GROUP_BY, description=f"Comma-separated: {', '.join(DIMENSIONS)} (e.g. arm,minute)."),
    ] = None,
    confidence: Annotated[float, Query(gt=0.5, lt=1)] = 0.95,
) -> dict[str, Any]:
    """Outcomes per group (CTR and conversion rate with Wilson intervals, revenue, spend, CPA, ROAS), the lift of
    targeted over control in CTR, conversion rate and revenue per impression, and unattributed conversions."""
    dims = list(dict.fromkeys(group_by.split(","))) if group_by else []
    filters = Filters(_instant(from_, "from"), _instant(to, "to"), ad_id, campaign_id, arm, model_version)
    store = OutcomeStore(settings.outcomes_path)
    rows = [_with_interval(r, confidence) for r in store.outcomes(dims, filters)]
    result = store.lift(filters, confidence)
    money = store.money_lift(filters, confidence)
    per_impression = money["revenue_per_impression"]
    return {
        "group_by": dims,
        "filters": {k: v for k, v in vars(filters).items() if v is not None},
        "rows": rows,
        "total": _with_interval(store.outcomes([], filters)[0], confidence),
        "lift": _finite(result.as_dict()),
        "conversion_lift": _finite(money["conversion_rate"].as_dict()),
        "revenue_per_impression_lift": _finite(per_impression),
        "unattributed": store.unattributed(from_, to),
    }


LIVE_WINDOWS = {"1h": 3_600_000, "24h": 86_400_000}


@router.get("/outcomes/live")
def live_outcomes(
    runtime: RuntimeDep,
    campaign_id: str | None = None,
    top: Annotated[int, Query(ge=1, le=100, description="Ads listed, by impressions over the last hour.")] = 10,
) -> dict[str, Any]:
    """Impressions, clicks and CTR over the last hour and day, in total, per campaign and for the top ads,
    from the `ad_performance` rows the feature consumer keeps in Redis (both arms together: the arm split
    and the lift are history, in `/v1/outcomes`). An ad's windows end at its latest event, so an ad is
    counted in a window only if that event lies inside it."""
    catalog = runtime.state.catalog
    ids = [str(a) for a in catalog.ad_ids]
    campaign_of = {ad: catalog.campaign_ids[catalog.campaign_code[row]] for row, ad in enumerate(ids)}
    if campaign_id is not None:
        ids = [ad for ad in ids if campaign_of[ad] == campaign_id]
    rows: dict[str, dict[str, Any]] = {}
    try:
        for start in range(0, len(ids), 1000):
            rows.update(runtime.reader.ads(ids[start : start + 1000]))
    except Exception as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Redis unavailable: {error}") from None
    now_ms = time.time() * 1000
    total = {w: [0, 0] for w in LIVE_WINDOWS}
    campaigns: dict[str, dict[str, list[int]]] = defaultdict(lambda: {w: [0, 0] for w in LIVE_WINDOWS})
    ads = []
    for ad, row in rows.items():
        seen = row.get("ad_last_seen_ms") or 0
        counts = {}
        for window, length in LIVE_WINDOWS.items():
            inside = now_ms - seen <= length
            counts[window] = [int(row.get(f"ad_{k}_{window}") or 0) if inside else 0 for k in ("impressions", "clicks")]
            for i in (0, 1):
                total[window][i] += counts[window][i]
                campaigns[campaign_of[ad]][window][i] += counts[window][i]
        ads.append({"ad_id": ad, "campaign_id": campaign_of[ad], **_live(counts)})
    ads.sort(key=lambda a: (-a["1h"]["impressions"], -a["24h"]["impressions"], a["ad_id"]))
    by_campaign = [{"campaign_id": c, **_live(v)} for c, v in campaigns.items()]
    by_campaign.sort(key=lambda c: (-c["1h"]["impressions"], -c["24h"]["impressions"], c["campaign_id"]))
    return {
        "source": "redis: the feature consumer's ad_performance rows (Feast online store)",
        "as_of": datetime.fromtimestamp(now_ms / 1000, tz=UTC).isoformat(),
        "total": _live(total),
        "campaigns": [c for c in by_campaign if c["24h"]["impressions"]],
        "ads": [a for a in ads if a["24h"]["impressions"]][:top],
    }


def _live(counts: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    return {w: {"impressions": n, "clicks": k, "ctr": k / n if n else None} for w, (n, k) in counts.items()}


def _with_interval(row: dict[str, Any], confidence: float) -> dict[str, Any]:
    n, out = row["impressions"], dict(row)
    for rate, hits in (("ctr", "clicks"), ("conversion_rate", "converted")):
        interval = wilson(row[hits], n, confidence)
        out[f"{rate}_low"], out[f"{rate}_high"] = (interval.low, interval.high) if n else (None, None)
    return out


def _finite(value: Any) -> Any:
    """NaN (an arm without impressions) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value
