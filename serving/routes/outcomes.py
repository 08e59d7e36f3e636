"""`GET /v1/outcomes`: impressions, clicks, CTR and conversions from the outcomes store, with the lift of
targeting over control."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status

from serving.deps import SettingsDep
from streaming.estimators import wilson
from streaming.outcomes import DIMENSIONS, Filters, OutcomeStore

router = APIRouter(prefix="/v1", tags=["outcomes"])


@router.get("/outcomes")
def outcomes(
    settings: SettingsDep,
    from_: Annotated[datetime | None, Query(alias="from", description="Impressions at or after (RFC 3339).")] = None,
    to: Annotated[datetime | None, Query(description="Impressions before (RFC 3339).")] = None,
    ad_id: str | None = None,
    campaign_id: str | None = None,
    arm: Annotated[str | None, Query(pattern="^(targeted|control)$")] = None,
    model_version: str | None = None,
    group_by: Annotated[
        str | None, Query(description=f"Comma-separated: {', '.join(DIMENSIONS)} (e.g. arm,minute).")
    ] = None,
    confidence: Annotated[float, Query(gt=0.5, lt=1)] = 0.95,
) -> dict[str, Any]:
    """Outcomes per group (CTR with a Wilson interval) and the lift of targeted over control."""
    dims = [g.strip() for g in group_by.split(",") if g.strip()] if group_by else []
    unknown = [g for g in dims if g not in DIMENSIONS]
    if unknown:
        detail = [{"loc": ["query", "group_by"], "msg": f"unknown {unknown}; choose from {', '.join(DIMENSIONS)}",
                   "type": "value_error"}]  # fmt: skip
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)
    filters = Filters(from_, to, ad_id, campaign_id, arm, model_version)
    store = OutcomeStore(settings.outcomes_path)
    rows = [_with_interval(r, confidence) for r in store.outcomes(dims, filters)]
    result = store.lift(filters, confidence)
    return {
        "group_by": dims,
        "filters": {k: v for k, v in vars(filters).items() if v is not None},
        "rows": rows,
        "total": _with_interval(store.outcomes([], filters)[0], confidence),
        "lift": _finite(result.as_dict()),
    }


def _with_interval(row: dict[str, Any], confidence: float) -> dict[str, Any]:
    interval = wilson(row["clicks"], row["impressions"], confidence)
    return {**row, "ctr_low": interval.low if row["impressions"] else None,
            "ctr_high": interval.high if row["impressions"] else None}  # fmt: skip


def _finite(value: Any) -> Any:
    """NaN (an arm without impressions) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value
