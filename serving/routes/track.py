"""`GET /c/{token}`: the click tracker of every served creative (serving/tracking.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
from fastapi import APIRouter, Response, status
from fastapi.responses import RedirectResponse

from serving import metrics
from serving.deps import RuntimeDep
from serving.http import JSONRoute
from serving.tracking import InvalidToken, decode_token

log = logging.getLogger(__name__)
router = APIRouter(tags=["tracking"], route_class=JSONRoute)


@router.get(
    "/c/{token}",
    status_code=status.HTTP_302_FOUND,
    responses={302: {"description": "To the ad's landing URL."}, 403: {"description": "Forged or edited token."}},
)
def click(token: str, runtime: RuntimeDep) -> Response:
    """Log the click (once per impression; a CPC ad is charged its bid) and redirect to the landing URL."""
    try:
        touch = decode_token(token, runtime.secret)
    except InvalidToken as error:
        metrics.CLICKS.labels("forged").inc()
        log.info("click token refused: %s", error)
        return Response("invalid click token", status.HTTP_403_FORBIDDEN, media_type="text/plain")
    catalog = runtime.state.catalog
    row = catalog.index.get(touch.ad_id)
    if row is None:  # removed from the catalog since it was served: nowhere to send the user
        metrics.CLICKS.labels("unknown_ad").inc()
        return Response("ad no longer in the catalog", status.HTTP_404_NOT_FOUND, media_type="text/plain")
    now_ms = int(time.time() * 1000)
    clicked = replace(touch, ts_ms=now_ms)  # attribution measures the window from the click
    try:
        new = runtime.touches.record_click(clicked)
    except Exception as error:  # Redis down: log the click (its id dedups it downstream), charge nothing
        log.warning("click not recorded in Redis (%s): logged unbilled and unattributable", error)
        new, outcome = None, "unbilled"
    else:
        outcome = "new" if new else "duplicate"
    metrics.CLICKS.labels(outcome).inc()
    if new is not False:
        record = {
            "event_id": touch.click_id,
            "event_type": "ad_click",
            "source": "serve:click",
            "user_id": touch.user_id,
            "ad_id": touch.ad_id,
            "campaign_id": touch.campaign_id,
            "category": catalog.categories[catalog.category_code[row]],
            "request_id": touch.request_id,
            "slot_id": touch.slot_id,
            "model_version": touch.model_version,
            "arm": touch.arm,
            "propensity": touch.propensity,
            "ts": now_ms,
        }
        if new and not catalog.cpm[row]:  # a CPC ad pays its bid for the first click of an impression
            record["cost"] = float(catalog.bid[row])
            runtime.pacer.charge(catalog, np.array([row]), np.array([record["cost"]]))
        runtime.logger.log([record])
    landing = catalog.creatives[row].get("landing_url") or ""
    if not landing:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return RedirectResponse(landing, status.HTTP_302_FOUND)
