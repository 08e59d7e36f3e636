"""OpenRTB 2.6: `POST /openrtb/2.6/bid` (BidRequest -> BidResponse or 204) and the billing notice."""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving import metrics
from serving.deps import NoticesDep, RuntimeDep, SettingsDep, SigningSecretDep
from serving.http import JSONRoute, Problem, bounded_errors
from serving.notices import notice_event_id, verify_notice
from serving.openapi import BID_REQUEST_REF
from serving.openrtb import BidRequest, BidResponse, to_response, to_selection
from serving.pipeline import touch_of

router = APIRouter(prefix="/openrtb/2.6", tags=["openrtb"], route_class=JSONRoute)


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
        "content": {"application/json": {"schema": {"$ref": BID_REQUEST_REF}, "example": EXAMPLE}},
    }
}


@router.post(
    "/bid",
    response_model=BidResponse,
    openapi_extra=OPENAPI_BODY,
    responses={
        204: {"description": "No bid."},
        400: {"description": "Invalid BidRequest: detail names the field.", "model": Problem},
    },
)
async def bid(request: Request, runtime: RuntimeDep, settings: SettingsDep, secret: SigningSecretDep) -> Response:
    """Bid on each imp we can fill above its floor within tmax; 204 when there is nothing to bid."""
    started = time.perf_counter()
    try:  # JSONRoute's request parses with orjson (no NaN, lone surrogates, non-UTF-8); 413 past the body cap
        req = BidRequest.model_validate(await request.json())
    except json.JSONDecodeError as error:
        detail = [{"loc": ["body", error.pos], "msg": f"JSON decode error: {error.msg}", "type": "json_invalid"}]
        return JSONResponse({"detail": detail}, status.HTTP_400_BAD_REQUEST)
    except ValidationError as error:
        return JSONResponse({"detail": bounded_errors(error.errors())}, status.HTTP_400_BAD_REQUEST)
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
        secret=secret,
        click_url=runtime.click_url,
        now_ms=int(time.time() * 1000),
    )
    if response is None:
        return _no_bid(started)
    degraded = runtime.pipeline.degraded("openrtb")
    if degraded:  # the billing notice's impression will wait in the buffer: say so to whoever reads the ext
        response.ext = {"adloop": {"degraded": degraded}}
    metrics.child(metrics.REQUEST_SECONDS, "openrtb").observe(time.perf_counter() - started)
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


@router.get(
    "/billing",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        403: {"description": "The signature does not match the notice's parameters: nothing logged or charged."},
        404: {"description": "The ad is not in the loaded catalog."},
    },
)
def billing(
    request: Request,
    runtime: RuntimeDep,
    notices: NoticesDep,
    secret: SigningSecretDep,
    r: Annotated[str, Query(min_length=1, max_length=256, description="Request id.")],
    i: Annotated[str, Query(min_length=1, max_length=256, description="Imp id.")],
    a: Annotated[str, Query(min_length=1, max_length=256, description="Ad id.")],
    u: Annotated[str, Query(min_length=1, max_length=256, description="User id.")],
    v: Annotated[str, Query(min_length=1, max_length=256, description="Model version.")],
    arm: Annotated[Literal["targeted", "control"], Query()],
    p: Annotated[float, Query(gt=0, le=1, allow_inf_nan=False, description="Propensity.")],
    sig: Annotated[str, Query(max_length=64, description="HMAC of the other parameters but price.")],
    price: Annotated[
        float | None, Query(ge=0, le=1_000_000, allow_inf_nan=False, description="Clearing price, CPM.")
    ] = None,
) -> Response:
    """Billing notice (`burl`): the exchange confirms the impression; it is logged and its price charged once.
    The signature is checked first (403: nothing happens); a retried notice is answered 204 and changes nothing."""
    if not verify_notice(dict(request.query_params), secret):
        metrics.ERRORS.labels("openrtb_billing", "bad_signature").inc()
        return JSONResponse({"detail": "invalid notice signature"}, status.HTTP_403_FORBIDDEN)
    catalog = runtime.state.catalog
    row = catalog.index.get(a)
    if row is None:
        return JSONResponse({"detail": "unknown ad"}, status.HTTP_404_NOT_FOUND)
    event_id = notice_event_id(r, i, a)
    if not notices.first(event_id):
        metrics.ERRORS.labels("openrtb_billing", "retried_notice").inc()
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    campaign = catalog.campaign_ids[catalog.campaign_code[row]]
    record = {
        "event_id": event_id,
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
    runtime.logger.log([record])  # sets the record's time
    if runtime.pipeline.touches is not None:  # last-impression attribution: an RTB impression is a touch too
        runtime.pipeline.touches.remember_impressions([touch_of(record)])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _no_bid(started: float) -> Response:
    metrics.NO_FILL.labels("openrtb").inc()
    metrics.child(metrics.REQUEST_SECONDS, "openrtb").observe(time.perf_counter() - started)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
