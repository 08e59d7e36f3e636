"""`GET /v1/ads`: the loaded catalog."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from serving.deps import RuntimeDep
from serving.http import JSONRoute

router = APIRouter(prefix="/v1", tags=["catalog"], route_class=JSONRoute)


@router.get("/ads")
def list_ads(
    runtime: RuntimeDep,
    category: str | None = None,
    format: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict:
    """Ads of the loaded catalog, optionally by category and slot format."""
    catalog = runtime.state.catalog
    rows = range(len(catalog))
    if category is not None:
        code = catalog.categories.index(category) if category in catalog.categories else -1
        rows = [r for r in rows if catalog.category_code[r] == code]
    if format is not None:
        mask = catalog.format_masks.get(format)
        rows = [r for r in rows if mask is not None and mask[r]]
    rows = list(rows)
    return {
        "catalog_version": catalog.version,
        "total": len(rows),
        "offset": offset,
        "ads": [catalog.describe(r) for r in rows[offset : offset + limit]],
    }
