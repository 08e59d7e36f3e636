"""Conversions: `POST /v1/conversions` (server-to-server postback) and `GET /v1/conversions/pixel`.

Both are signed with the shared secret (`serving.signing`): the postback's raw body in the
`X-Adloop-Signature` header (`sign({"body": <body>})`), the pixel's query parameters in `sig`. Each
conversion is attributed to the user's last click (or, `ADLOOP_ATTRIBUTION_MODEL=impression`, last
impression), or to the click it names, when that touch lies within `ADLOOP_ATTRIBUTION_WINDOW_S`
before it, and logged as a `conversion` event with the touch's request, ad, campaign, arm and model
version; otherwise it is logged unattributed (no ad, no arm) and counted. An idempotency key makes a
retried postback count once: the event id derives from it, and Redis remembers it for the window.
"""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving import metrics, signing
from serving.deps import RuntimeDep, SettingsDep
from serving.http import JSONRoute
from serving.runtime import Runtime
from serving.tracking import Touch, conversion_id

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/conversions", tags=["conversions"], route_class=JSONRoute)
Id = Annotated[str, Field(min_length=1, max_length=256)]
MAX_BODY = 16 * 1024
# The smallest transparent GIF: what a pixel answers.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


class ConversionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idempotency_key: Id = Field(description="The same key for every retry of one conversion: it counts once.")
    user_id: Id | None = Field(default=None, description="Attribute to this user's last click (or impression).")
    click_id: Id | None = Field(default=None, description="Attribute to this click (the `clk-...` id).")
    value: float = Field(default=0.0, ge=0, description="Revenue of the conversion, in `currency`.")
    currency: str = Field(default="USD", pattern="^[A-Z]{3}$")
    ts: datetime | None = Field(default=None, description="When it converted (RFC 3339 with a zone); default now.")

    @model_validator(mode="after")
    def _someone(self) -> ConversionIn:
        if not self.user_id and not self.click_id:
            raise ValueError("user_id or click_id is required")
        if self.ts is not None and self.ts.tzinfo is None:
            raise ValueError("ts needs a time zone")
        return self


@router.post("", responses={403: {"description": "Missing or wrong X-Adloop-Signature."}})
async def postback(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    x_adloop_signature: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Log a conversion attributed to its touch (or unattributed); a repeated idempotency key counts once."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {MAX_BODY} bytes")
    text = raw.decode("utf-8", errors="replace")
    if not signing.verify({"body": text, signing.SIGNATURE_PARAM: x_adloop_signature or ""}, runtime.secret):
        metrics.CONVERSIONS.labels("forged").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, "X-Adloop-Signature does not verify")
    try:
        body = ConversionIn.model_validate_json(raw)
    except ValidationError as error:
        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
    return convert(runtime, settings, body)


@router.get("/pixel", responses={200: {"content": {"image/gif": {}}}, 403: {"description": "Bad signature."}})
def pixel(
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    k: Annotated[str, Query(min_length=1, max_length=256, description="Idempotency key.")],
    sig: Annotated[str, Query(max_length=64)],
    u: Annotated[str | None, Query(max_length=256, description="User id.")] = None,
    click: Annotated[str | None, Query(max_length=256, description="Click id.")] = None,
    value: Annotated[float, Query(ge=0)] = 0.0,
    cur: Annotated[str, Query(pattern="^[A-Z]{3}$")] = "USD",
) -> Response:
    """The browser-side conversion: the same as the postback, signed over its query parameters; a 1x1 GIF."""
    if not signing.verify(dict(request.query_params), runtime.secret):
        metrics.CONVERSIONS.labels("forged").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, "sig does not verify")
    try:
        body = ConversionIn(idempotency_key=k, user_id=u, click_id=click, value=value, currency=cur)
    except ValidationError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None
    convert(runtime, settings, body)
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store"})


def convert(runtime: Runtime, settings, body: ConversionIn) -> dict[str, Any]:
    """Attribute, dedup and log one conversion; the answer says what happened."""
    if body.currency != settings.currency:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"currency must be {settings.currency}")
    at_ms = int((body.ts or datetime.now(UTC)).timestamp() * 1000)
    event_id = conversion_id(body.idempotency_key)
    client = runtime.touches.client
    try:
        first = client.set(f"adloop:conversion:{event_id}", 1, nx=True, ex=runtime.touches.ttl)
        touch = runtime.touches.last(user_id=body.user_id, click=body.click_id, model=settings.attribution_model)
    except Exception as error:  # the postback is retried by its sender: refuse rather than lose the attribution
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Redis unavailable: {error}") from None
    if not first:
        metrics.CONVERSIONS.labels("duplicate").inc()
        return {"event_id": event_id, "duplicate": True}
    reason = _unattributable(touch, at_ms, settings.attribution_window_s * 1000)
    record: dict[str, Any] = {
        "event_id": event_id,
        "event_type": "conversion",
        "source": "serve:conversion",
        "user_id": body.user_id or (touch.user_id if touch else f"click:{body.click_id}"),
        "ts": at_ms,
        "value": body.value,
        "currency": body.currency,
        "context": {"attribution": reason or settings.attribution_model},
    }
    if body.click_id:
        record["context"]["click_id"] = body.click_id
    if reason is None:
        assert touch is not None
        record |= {"request_id": touch.request_id, "ad_id": touch.ad_id, "campaign_id": touch.campaign_id,
                   "slot_id": touch.slot_id, "arm": touch.arm, "model_version": touch.model_version,
                   "propensity": touch.propensity}  # fmt: skip
    metrics.CONVERSIONS.labels("unattributed" if reason else "attributed").inc()
    runtime.logger.log([record])
    answer = {"event_id": event_id, "duplicate": False, "attributed": reason is None}
    if reason is None:
        answer |= {"request_id": touch.request_id, "ad_id": touch.ad_id, "arm": touch.arm}
    else:
        answer["reason"] = reason
    return answer


def _unattributable(touch: Touch | None, at_ms: int, window_ms: float) -> str | None:
    """Why a conversion at `at_ms` cannot go to `touch` (None: it can)."""
    if touch is None:
        return "no_touch"  # never clicked, or its touch expired from Redis
    if at_ms < touch.ts_ms:
        return "before_touch"
    if at_ms - touch.ts_ms > window_ms:
        return "expired"
    return None


def sign_postback(body: bytes, secret: bytes) -> str:
    """The `X-Adloop-Signature` of a postback body (for senders written in Python, and the demo)."""
    return signing.sign({"body": body.decode("utf-8", errors="replace")}, secret)
