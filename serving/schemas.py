"""Request and response bodies of `POST /v1/select` (pydantic; FastAPI turns problems into 422s naming the field)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.catalog import KNOWN_FORMATS

Id = Annotated[str, Field(min_length=1, max_length=256)]
Format = Literal[KNOWN_FORMATS]  # type: ignore[valid-type]
ContextValue = str | int | float | bool | None  # the event contract's context values


class SlotIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slot_id: Id
    format: Format = Field(description=f"One of {', '.join(KNOWN_FORMATS)}.")
    position: int | None = Field(default=None, ge=0, description="Where the slot sits on the page.")
    count: int = Field(default=1, ge=1, le=10, description="How many ads this slot shows.")


class Context(BaseModel):
    """Page and device context; extra scalar keys are kept (and logged with the impression)."""

    model_config = ConfigDict(extra="allow")

    page_category: str | None = None
    device: str | None = None
    country: str | None = None

    @model_validator(mode="after")
    def _scalars_only(self) -> Context:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, str | int | float | bool | type(None)):
                raise ValueError(f"context.{key} must be a string, number, boolean or null")
        return self


class SelectRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
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
    slots: list[SlotIn] = Field(min_length=1)
    context: Context = Field(default_factory=Context)
    candidate_ad_ids: list[Id] | None = Field(default=None, description="Serve only from these ads.")
    exclude_ad_ids: list[Id] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_slots(self) -> SelectRequest:
        ids = [s.slot_id for s in self.slots]
        if len(set(ids)) != len(ids):
            raise ValueError("slots: slot_id values must be unique")
        return self


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
