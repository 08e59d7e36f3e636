"""Request and response bodies of `POST /v1/select` (pydantic; FastAPI turns problems into 422s naming the field).

The schema states every bound the route enforces, so a request the OpenAPI schema allows is served
and one it forbids gets a 422 naming the field. Types are strict: `true` is not a number and `"1"`
not an integer. The bounds keep an impression record (ids + context) well inside the event
contract's 16 KiB (`streaming.events.MAX_EVENT_BYTES`): 256 + 256 + 20 x (64 + 256) bytes of text.
Settings (`max_slots`, `max_count_per_slot`, `max_candidate_ids`) may lower the first three further.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, field_validator

from serving.catalog import KNOWN_FORMATS

MAX_SLOTS = 10
MAX_COUNT_PER_SLOT = 10
MAX_CANDIDATE_IDS = 1000
MAX_CONTEXT_KEYS = 20
MAX_CONTEXT_KEY = 64  # characters
MAX_CONTEXT_TEXT = 256  # characters of a string value


def integral_floats(value: object) -> object:
    """JSON Schema's integer includes 2.0: take it as 2 (strict ints refuse it; true, "2" and 2.5 stay refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Format = Literal[KNOWN_FORMATS]  # type: ignore[valid-type]
ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTEXT_KEY)]
ContextText = Annotated[str, StringConstraints(max_length=MAX_CONTEXT_TEXT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
# The event contract's context values; bool before int so that `true` stays a boolean.
ContextValue = StrictBool | StrictInt | Finite | ContextText | None
Context = Annotated[
    dict[ContextKey, ContextValue],
    Field(
        max_length=MAX_CONTEXT_KEYS,
        description="Page and device context (e.g. page_category, device, country): scalar values, kept and "
        "logged with the impression; null values are dropped.",
    ),
]


class SlotIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    slot_id: Id
    format: Format = Field(description=f"One of {', '.join(KNOWN_FORMATS)}.")
    position: int | None = Field(default=None, ge=0, le=10_000, description="Where the slot sits on the page.")
    count: int = Field(default=1, ge=1, le=MAX_COUNT_PER_SLOT, description="How many ads this slot shows.")

    _integers = field_validator("position", "count", mode="before")(integral_floats)


class SelectRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "request_id": "req-123",
                    "user_id": "u-42",
                    "slots": [
                        {"slot_id": "top", "format": "banner_728x90", "position": 0},
                        {"slot_id": "feed", "format": "native", "count": 2},
                    ],
                    "context": {"page_category": "sports", "device": "mobile", "country": "DE"},
                    "exclude_ad_ids": ["ad-00017"],
                }
            ]
        },
    )

    request_id: Id | None = Field(default=None, description="Joins impressions and clicks; generated if absent.")
    user_id: Id
    slots: list[SlotIn] = Field(
        min_length=1,
        max_length=MAX_SLOTS,
        description="A slot id repeated in one request is served once: its later slots get no ads.",
    )
    context: Context = Field(default_factory=dict)
    candidate_ad_ids: list[Id] | None = Field(
        default=None, max_length=MAX_CANDIDATE_IDS, description="Serve only from these ads."
    )
    exclude_ad_ids: list[Id] = Field(default_factory=list, max_length=MAX_CANDIDATE_IDS)


class Creative(BaseModel):
    title: str
    image_url: str
    landing_url: str


class ChosenAdOut(BaseModel):
    ad_id: str
    campaign_id: str
    rank: int = Field(description="1 = first in the slot.")
    creative: Creative
    pctr: float = Field(description="Predicted click probability.")
    price: float = Field(description="eCPM in USD (1000 x pCTR x CPC bid).")
    propensity: float = Field(description="Probability the policy chose this ad here.")
    click_url: str = Field(description="Signed click tracker: logs the click and redirects to the landing URL.")


class SlotOut(BaseModel):
    slot_id: str
    format: str
    ads: list[ChosenAdOut]


class SelectResponse(BaseModel):
    request_id: str
    user_id: str
    arm: Literal["targeted", "control"]
    model_version: str
    fallback: bool
    fallback_reason: str | None = Field(
        default=None, description="no_model, model_error, redis_down, redis_slow, features_error, internal_error"
    )
    slots: list[SlotOut]
    degraded: list[str] = Field(
        default_factory=list,
        description="Degraded modes this answer was served in: impression_log (Kafka impression logging is down; "
        "the impressions wait in a bounded buffer).",
    )
