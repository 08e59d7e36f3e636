"""`POST /v1/select`: the website's ad slots ask for ads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import orjson
from fastapi import APIRouter, HTTPException, Response, status

from serving import metrics
from serving.deps import RuntimeDep, SettingsDep
from serving.http import JSONRoute
from serving.schemas import SelectRequest, SelectResponse
from serving.selection_types import SelectionRequest, Slot
from serving.tracking import Touch

router = APIRouter(prefix="/v1", tags=["selection"], route_class=JSONRoute)


@router.post("/select", response_model=SelectResponse)
async def select_ads(body: SelectRequest, runtime: RuntimeDep, settings: SettingsDep) -> Response:
    """Choose ads for each slot (targeted or control arm); degraded answers are flagged, never errors."""
    started = time.perf_counter()
    _check_limits(body, settings)
    request = SelectionRequest(
        request_id=body.request_id or uuid.uuid4().hex,
        user_id=body.user_id,
        slots=_unique_slots(body),
        context={k: v for k, v in body.context.items() if v is not None},
        candidate_ad_ids=body.candidate_ad_ids,
        exclude_ad_ids=body.exclude_ad_ids,
    )
    state, result = await runtime.pipeline.run(request)
    answer = response_body(result, body, state.catalog, click_url=runtime.click_url)
    answer["degraded"] = runtime.pipeline.degraded("select")
    metrics.child(metrics.REQUEST_SECONDS, "select").observe(time.perf_counter() - started)
    return Response(orjson.dumps(answer), media_type="application/json")


def response_body(result, body: SelectRequest, catalog, *, click_url: Callable[[Touch], str]) -> dict:
    """The `SelectResponse` as plain data (serialised once, without re-validating what we built): one entry per
    requested slot, in request order; a repeated slot id's later slots are empty. Each ad carries its signed
    click-tracking URL."""
    now_ms = int(time.time() * 1000)

    def touch(c, slot_id: str) -> Touch:
        return Touch(result.request_id, c.ad_id, c.campaign_id, result.arm, result.model_version, c.propensity,
                     result.user_id, slot_id, now_ms)  # fmt: skip

    slots, answered = [], set()
    for s in body.slots:
        picks = [] if s.slot_id in answered else result.slots.get(s.slot_id, [])
        answered.add(s.slot_id)
        ads = [
            {
                "ad_id": c.ad_id,
                "campaign_id": c.campaign_id,
                "rank": c.rank,
                "creative": catalog.creatives[c.row],
                "pctr": c.pctr,
                "price": round(c.price, 6),
                "propensity": c.propensity,
                "click_url": click_url(touch(c, s.slot_id)),
            }
            for c in picks
        ]
        slots.append({"slot_id": s.slot_id, "format": s.format, "ads": ads})
    return {
        "request_id": result.request_id,
        "user_id": result.user_id,
        "arm": result.arm,
        "model_version": result.model_version,
        "fallback": result.fallback is not None,
        "fallback_reason": result.fallback,
        "slots": slots,
    }


def _unique_slots(body: SelectRequest) -> list[Slot]:
    """The slots to serve: a repeated slot id is served once, as its first slot (ads are chosen and logged per id)."""
    first: dict[str, Slot] = {}
    for s in body.slots:
        first.setdefault(s.slot_id, Slot(s.slot_id, s.format, s.count, s.position))
    return list(first.values())


def _check_limits(body: SelectRequest, settings) -> None:
    problems = []
    if len(body.slots) > settings.max_slots:
        problems.append((["body", "slots"], f"at most {settings.max_slots} slots per request, got {len(body.slots)}"))
    for name in ("candidate_ad_ids", "exclude_ad_ids"):
        values = getattr(body, name) or []
        if len(values) > settings.max_candidate_ids:
            problems.append((["body", name], f"at most {settings.max_candidate_ids} ids, got {len(values)}"))
    for i, slot in enumerate(body.slots):
        if slot.count > settings.max_count_per_slot:
            problems.append((["body", "slots", i, "count"], f"at most {settings.max_count_per_slot}"))
    if problems:
        detail = [{"loc": loc, "msg": msg, "type": "value_error.limit"} for loc, msg in problems]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)
