"""OpenRTB 2.6 adapter (no FastAPI): BidRequest -> `SelectionRequest`, `SelectionResult` -> BidResponse.

Only the objects the bidder reads are modelled; unknown fields and `ext` are accepted and ignored,
as the spec asks of bidders. Prices are CPM in USD (`cur` must allow USD). Each imp is one slot:
`banner` (its w x h or `format[]`, the first size the catalog knows) or `native`; video / audio-only
imps get no bid. `pmp.deals` let deal ads bid with the deal id; `private_auction = 1` restricts the
imp to deal ads at the deals' floors. The win is not known at bid time, so the impression is logged
when the exchange calls the billing notice URL (`burl`, with `${AUCTION_PRICE}`). The markup's click-through
(the banner's link, the native `link.url`) is the signed click tracker (`GET /c/{token}`) of that same
impression (request id, imp as slot, ad, arm, model version, propensity), which redirects to the landing URL.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.catalog import IAB_CATEGORY, KNOWN_FORMATS, Catalog
from serving.notices import signed_query
from serving.schemas import integral_floats
from serving.selection_types import SelectionRequest, SelectionResult, Slot
from serving.tracking import Touch
from streaming.events import MAX_ID

# Ids and the texts kept in the impression's context are bounded as the event contract's ids are.
Text = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
Short = Annotated[str, Field(max_length=MAX_ID)]
Price = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]  # CPM
Size = Annotated[int, Field(ge=0, le=100_000)]  # pixels
Flag = Annotated[int, Field(ge=0, le=1)]  # OpenRTB's 0/1 (a JSON boolean is not one)


class _Open(BaseModel):
    # Strict: `true` is not a number and "300" not an integer (the spec's types); no NaN or Infinity.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    # 300.0 is a JSON Schema integer: the integer fields (w, h, test, at, ...) take it as 300.
    _integers = field_validator("*", mode="before")(lambda value: integral_floats(value))


class Format(_Open):
    w: Size | None = None
    h: Size | None = None


class Banner(_Open):
    w: Size | None = None
    h: Size | None = None
    format: list[Format] | None = Field(default=None, max_length=100)

    def sizes(self) -> list[tuple[int, int]]:
        out = [(f.w, f.h) for f in self.format or [] if f.w and f.h]
        return ([(self.w, self.h)] if self.w and self.h else []) + out


class Native(_Open):
    request: str = Field(max_length=16 * 1024, description="The Native Ad request, a JSON string.")
    ver: str | None = None


class Deal(_Open):
    id: Text
    bidfloor: Price = 0.0
    bidfloorcur: str = "USD"


class Pmp(_Open):
    private_auction: Flag = 0
    deals: list[Deal] = Field(default_factory=list, max_length=100)


class Imp(_Open):
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [media], "properties": {media: {"type": "object"}}}
                for media in ("banner", "native", "video", "audio")
            ]
        }
    )

    id: Text
    banner: Banner | None = None
    native: Native | None = None
    video: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    pmp: Pmp | None = None
    tagid: str | None = None
    bidfloor: Price = 0.0
    bidfloorcur: str = "USD"

    @model_validator(mode="after")
    def _has_media(self) -> Imp:
        if all(media is None for media in (self.banner, self.native, self.video, self.audio)):
            raise ValueError("an imp needs one of banner, native, video, audio")
        return self


class Publisher(_Open):
    id: str | None = None


class Site(_Open):
    id: str | None = None
    domain: Short | None = None
    page: str | None = None
    cat: list[str] | None = None
    publisher: Publisher | None = None


class App(_Open):
    id: str | None = None
    bundle: Short | None = None
    cat: list[str] | None = None
    publisher: Publisher | None = None


class Geo(_Open):
    country: Short | None = None


class Device(_Open):
    ua: str | None = None
    ifa: Text | None = None
    devicetype: Annotated[int, Field(ge=0, le=1000)] | None = None
    os: Short | None = None
    geo: Geo | None = None


class User(_Open):
    id: Text | None = None
    buyeruid: Text | None = None


class BidRequest(_Open):
    """The BidRequest fields the bidder reads (others, and `ext`, are accepted and ignored)."""

    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["site", "app"],
                "properties": {"site": {"type": "object"}, "app": {"type": "object"}},
            }
        }
    )

    id: Text  # also the selection's request id (an impression field)
    imp: list[Imp] = Field(min_length=1, max_length=20, description="A repeated imp id: only its first imp gets a bid.")
    site: Site | None = None
    app: App | None = None
    device: Device | None = None
    user: User | None = None
    test: Flag = 0
    at: int = 2
    tmax: int | None = Field(default=None, gt=0, le=60_000, description="Milliseconds the exchange waits for the bid.")
    cur: list[str] | None = Field(default=None, max_length=100)
    bcat: list[str] = Field(default_factory=list, max_length=1000)
    badv: list[str] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _site_or_app(self) -> BidRequest:
        if self.site is not None and self.app is not None:
            raise ValueError("site and app are mutually exclusive")
        return self


class Bid(BaseModel):
    id: str
    impid: str
    price: float
    adid: str
    crid: str
    cid: str
    adomain: list[str]
    cat: list[str]
    adm: str
    burl: str
    dealid: str | None = None
    w: int | None = None
    h: int | None = None


class SeatBid(BaseModel):
    seat: str = "adloop"
    bid: list[Bid]


class BidResponse(BaseModel):
    id: str
    seatbid: list[SeatBid]
    bidid: str
    cur: str = "USD"
    ext: dict[str, Any] | None = None  # {"adloop": {"degraded": [...]}} while a dependency is degraded


def to_selection(req: BidRequest) -> tuple[SelectionRequest, dict[str, tuple[str, int | None, int | None]]]:
    """The selection request, and per imp id its (format, w, h); imps we cannot serve are left out."""
    slots, shapes = [], {}
    if req.cur and "USD" not in req.cur:
        return _request(req, []), {}
    for imp in req.imp:
        shape = _shape(imp)
        if shape is None or imp.bidfloorcur != "USD" or imp.id in shapes:  # a repeated imp id: its first imp
            continue
        deals = [d for d in (imp.pmp.deals if imp.pmp else []) if d.bidfloorcur == "USD"]
        private = bool(imp.pmp and imp.pmp.private_auction)
        slots.append(
            Slot(
                imp.id,
                shape[0],
                1,
                None,
                imp.bidfloor,
                tuple(d.id for d in deals),
                tuple(d.bidfloor for d in deals),
                private,
            )
        )
        shapes[imp.id] = shape
    return _request(req, slots), shapes


def to_response(
    req: BidRequest,
    result: SelectionResult,
    shapes: dict,
    catalog: Catalog,
    *,
    notice_url: str,
    natives: dict[str, str],
    secret: bytes,
    click_url: Callable[[Touch], str],
    now_ms: int,
) -> BidResponse | None:
    """The BidResponse of a selection, or None (no bid -> HTTP 204). `click_url` signs a served ad's click
    tracker; the billing notice logs the impression under the same request id and ad, so the click joins it."""
    bids = []
    for imp_id, picks in result.slots.items():
        for choice in picks[:1]:
            fmt, w, h = shapes[imp_id]
            row = choice.row
            creative = catalog.creatives[row]
            domain = catalog.advertiser_domains[catalog.advertiser_code[row]]
            query = {
                "r": result.request_id,
                "i": imp_id,
                "a": choice.ad_id,
                "u": result.user_id,
                "v": result.model_version,
                "arm": result.arm,
                "p": f"{choice.propensity:.6g}",
            }
            touch = Touch(result.request_id, choice.ad_id, choice.campaign_id, result.arm, result.model_version,
                          choice.propensity, result.user_id, imp_id, now_ms)  # fmt: skip
            tracker = click_url(touch)
            adm = (
                _native_adm(natives.get(imp_id, ""), creative, domain, tracker)
                if fmt == "native"
                else _banner_adm(creative, w, h, tracker)
            )
            bids.append(
                Bid(
                    id=f"{result.request_id}:{imp_id}",
                    impid=imp_id,
                    price=round(choice.price, 6),
                    adid=choice.ad_id,
                    crid=f"cr-{choice.ad_id}",
                    cid=choice.campaign_id,
                    adomain=[domain],
                    cat=[IAB_CATEGORY.get(catalog.categories[catalog.category_code[row]], "IAB24")],
                    adm=adm,
                    burl=f"{notice_url}?{urlencode(signed_query(query, secret))}&price=${{AUCTION_PRICE}}",
                    dealid=choice.deal_id,
                    w=w,
                    h=h,
                )
            )
    if not bids:
        return None
    return BidResponse(id=req.id, seatbid=[SeatBid(bid=bids)], bidid=result.request_id)


def user_id_of(req: BidRequest) -> str:
    """Our id for the user: buyeruid (our cookie match), else the exchange's id, else the device ad id."""
    user, device = req.user or User(), req.device or Device()
    return user.buyeruid or user.id or device.ifa or f"anon:{req.id}"


def _request(req: BidRequest, slots: list[Slot]) -> SelectionRequest:
    device = req.device or Device()
    context: dict[str, Any] = {"channel": "app" if req.app else "site", "exchange_request_id": req.id}
    if req.site and req.site.domain:
        context["domain"] = req.site.domain
    if req.app and req.app.bundle:
        context["bundle"] = req.app.bundle
    if device.devicetype is not None:
        context["devicetype"] = device.devicetype
    if device.os:
        context["os"] = device.os
    if device.geo and device.geo.country:
        context["country"] = device.geo.country
    return SelectionRequest(
        request_id=req.id,
        user_id=user_id_of(req),
        slots=slots,
        context=context,
        blocked_categories=list(req.bcat),
        blocked_domains=list(req.badv),
    )


def _shape(imp: Imp) -> tuple[str, int | None, int | None] | None:
    if imp.banner is not None:
        for w, h in imp.banner.sizes():
            if f"banner_{w}x{h}" in KNOWN_FORMATS:
                return f"banner_{w}x{h}", w, h
    if imp.native is not None:
        return "native", None, None
    return None


def _banner_adm(creative: dict[str, str], w: int | None, h: int | None, click_url: str) -> str:
    e = html.escape
    return (
        f'<a href="{e(click_url)}" target="_blank" rel="noopener">'
        f'<img src="{e(creative["image_url"])}" width="{w}" height="{h}" alt="{e(creative["title"])}"></a>'
    )


def _native_adm(request_text: str, creative: dict[str, str], domain: str, click_url: str) -> str:
    """Native 1.2 response: fill the requested title / image / data assets by their ids; the link is the tracker."""
    try:
        spec = json.loads(request_text) if request_text else {}
        assets = (spec.get("native", spec) if isinstance(spec, dict) else {}).get("assets") or []
    except (ValueError, AttributeError):
        assets = []
    out = []
    for asset in assets if isinstance(assets, list) else []:
        if not isinstance(asset, dict) or "id" not in asset:
            continue
        if "title" in asset:
            out.append({"id": asset["id"], "title": {"text": creative["title"]}})
        elif "img" in asset:
            out.append({"id": asset["id"], "img": {"url": creative["image_url"]}})
        elif "data" in asset:
            out.append({"id": asset["id"], "data": {"value": domain}})
    if not out:
        out = [{"id": 1, "title": {"text": creative["title"]}}, {"id": 2, "img": {"url": creative["image_url"]}}]
    return json.dumps({"native": {"ver": "1.2", "assets": out, "link": {"url": click_url}}})
