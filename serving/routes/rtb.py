"""OpenRTB 2.6: `POST /openrtb/2.6/bid` (BidRequest -> BidResponse or 204) and the billing notice."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving import metrics
from serving.deps import RuntimeDep, SettingsDep
from serving.openrtb import BidRequest, BidResponse, to_response, to_selection

router = APIRouter(prefix="/openrtb/2.6", tags=["openrtb"])
MAX_BODY = 256 * 1024


EXAMPLE = {
    "id": "80ce30c53c16e6ede735f123ef6e32361bfc7b22",
    "cur": ["USD"],
    "tmax": 120,
    "imp": [{"id": "1", "bidfloor": 0.03, "banner": {"w": 300, "h": 250}}],
    "site": {"id": "102855", "domain": "www.foobar.com", "page": "http://www.foobar.com/1234.html"},
    "device": {"ua": "Mozilla/5.0", "ip": "123.145.167.10", "geo": {"country": "USA"}},
    "user": {"id": "55816b39711f9b5acf3b90e313ed29e51665623f"},
    "bcat": ["IAB25"],
    "badv": ["example.com"],
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": "An OpenRTB 2.6 BidRequest (JSON); validated by serving.openrtb.BidRequest.",
        "content": {"application/json": {"schema": {"type": "object"}, "example": EXAMPLE}},
    }
}


@router.post(
    "/bid",
    response_model=BidResponse,
    openapi_extra=OPENAPI_BODY,
    responses={204: {"description": "No bid."}, 400: {"description": "Invalid BidRequest: detail names the field."}},
)
async def bid(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> Response:
    """Bid on each imp we can fill above its floor within tmax; 204 when there is nothing to bid."""
    started = time.perf_counter()
    raw = await request.body()
    if len(raw) > MAX_BODY:
        return JSONResponse({"detail": f"body over {MAX_BODY} bytes"}, status.HTTP_413_CONTENT_TOO_LARGE)
    try:
        req = BidRequest.model_validate_json(raw)
    except ValidationError as error:
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        return JSONResponse({"detail": detail}, status.HTTP_400_BAD_REQUEST)
    budget_s = (req.tmax - settings.openrtb_tmax_margin_ms) / 1000 if req.tmax else None
    if budget_s is not None and budget_s <= 0:
        return _no_bid(started)
    selection, shapes = to_selection(req)
    if not selection.slots:
        return _no_bid(started)
    natives = {imp.id: imp.native.request for imp in req.imp if imp.native is not None}
    left_s = None if budget_s is None else budget_s - (time.perf_counter() - started)
    state, result = await runtime.pipeline.run(selection, route="openrtb", log_impressions=False, deadline_s=left_s)
    if budget_s is not None and time.perf_counter() - started > budget_s:
        metrics.ERRORS.labels("openrtb", "tmax_exceeded").inc()
        return _no_bid(started)
    response = to_response(
        req,
        result,
        shapes,
        state.catalog,
        natives=natives,
        notice_url=f"{settings.public_url.rstrip('/')}/openrtb/2.6/billing",
    )
    if response is None:
        return _no_bid(started)
    metrics.child(metrics.REQUEST_SECONDS, "openrtb").observe(time.perf_counter() - started)
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


@router.get("/billing", status_code=status.HTTP_204_NO_CONTENT)
def billing(
    runtime: RuntimeDep,
    r: Annotated[str, Query(max_length=256)],
    i: Annotated[str, Query(max_length=256)],
    a: Annotated[str, Query(max_length=256)],
    u: Annotated[str, Query(max_length=256)],
    v: Annotated[str, Query(max_length=256)],
    arm: Annotated[str, Query(pattern="^(targeted|control)$")],
    p: Annotated[float, Query(gt=0, le=1)],
    price: Annotated[float | None, Query(ge=0)] = None,
) -> Response:
    """Billing notice (`burl`): the exchange confirms the impression; it is logged and its price charged."""
    catalog = runtime.state.catalog
    row = catalog.index.get(a)
    if row is None:
        return Response(status_code=status.HTTP_404_NOT_FOUND)
    campaign = catalog.campaign_ids[catalog.campaign_code[row]]
    record = {
        "user_id": u,
        "ad_id": a,
        "campaign_id": campaign,
        "request_id": r,
        "slot_id": i,
        "position": 1,
        "model_version": v,
        "arm": arm,
        "propensity": p,
        "context": {"channel": "openrtb"},
    }
    if price is not None:
        record["context"]["clearing_price_cpm"] = price
        if catalog.cpm[row]:  # a CPM ad pays the clearing price; a CPC ad pays on its tracked click
            record["cost"] = price / 1000
            runtime.pacer.charge(catalog, np.array([row]), np.array([price / 1000]))
    runtime.logger.log([record])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _no_bid(started: float) -> Response:
    metrics.NO_FILL.labels("openrtb").inc()
    metrics.child(metrics.REQUEST_SECONDS, "openrtb").observe(time.perf_counter() - started)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
