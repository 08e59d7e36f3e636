"""Impression records: what each served ad's `ad_impression` event holds, and its Kafka message.

`impression_records` builds the records (plain dicts: appending one to the logger's buffer costs
nothing); `encode` turns one into its message (key = user id, value = the contract's JSON) on the
logger's thread. Its fast path writes the bytes `Event.to_bytes` would, without building the pydantic
`Event`; anything it does not vouch for goes through `to_event`, which has the last word.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kafka.partitioner.default import murmur2

from serving.selection_types import SelectionRequest, SelectionResult
from streaming.events import MAX_ID, SCHEMA_VERSION, Event, EventType, encode_json, format_ts


def impression_records(
    result: SelectionResult, request: SelectionRequest, costs: dict[tuple[str, str], float] | None = None
) -> list[dict[str, Any]]:
    """One record per served ad (fields of the `ad_impression` event); `costs`: (slot id, ad id) -> USD charged
    for the impression (CPM ads)."""
    costs = costs or {}
    slots = {s.slot_id: s for s in request.slots}
    records = []
    for slot_id, picks in result.slots.items():
        slot = slots[slot_id]
        context = {**request.context, "format": slot.format}
        if slot.position is not None:
            context["slot_position"] = slot.position
        if result.fallback:
            context["fallback"] = result.fallback
        for c in picks:
            records.append(
                {
                    "event_id": uuid.uuid4().hex,
                    "user_id": result.user_id,
                    "ad_id": c.ad_id,
                    "campaign_id": c.campaign_id,
                    "category": c.category,
                    "request_id": result.request_id,
                    "slot_id": slot_id,
                    "position": c.rank,
                    "model_version": result.model_version,
                    "arm": result.arm,
                    "propensity": c.propensity,
                    "context": {**context, "advertiser_id": c.advertiser_id},
                    "ts": int(time.time() * 1000),
                    "cost": costs.get((slot_id, c.ad_id)),
                }
            )
    return records


def partition(key: bytes, partitions: list[int]) -> int:
    """The partition kafka-python's default partitioner picks for `key` among the topic's sorted `partitions`
    (murmur2, as the Java client): passing it to `send` skips the partitioner's per-record work."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


def encode(record: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of one impression's Kafka message: the user id and the contract's JSON.

    The value parses (`streaming.events.parse_event`) into the very `Event` that `to_event(record)`
    gives, without building one (a few us against ~20 for pydantic and `Event.to_bytes`). Type and
    range checks accept what `impression_records` builds; a record they do not accept
    goes through `to_event`, which has the last word and raises if it breaks the contract. Also
    raises on what cannot be sent at all (e.g. text with a lone surrogate)."""
    data = _checked(record)
    if data is None:
        event = to_event(record)
        return event.user_id.encode(), event.to_bytes()
    return data["user_id"].encode(), encode_json(data)


def to_event(record: dict[str, Any]) -> Event:
    """A record (what `log()` takes) as a contract `Event`: an impression, or the `event_type` it names (the
    click tracker's `ad_click` and the conversion routes' `conversion` travel the same way)."""
    return Event(
        event_id=record.get("event_id") or uuid.uuid4().hex,
        schema_version=SCHEMA_VERSION,
        event_type=EventType(record.get("event_type", EventType.ad_impression)),
        user_id=record["user_id"],
        ts=datetime.fromtimestamp(record["ts"] / 1000, tz=UTC),
        ad_id=record.get("ad_id"),
        campaign_id=record.get("campaign_id"),
        category=record.get("category"),
        request_id=record.get("request_id"),
        slot_id=record.get("slot_id"),
        position=record.get("position"),
        model_version=record.get("model_version"),
        arm=record.get("arm"),
        propensity=record.get("propensity"),
        source=record.get("source", "serve"),
        context=record.get("context") or None,
        value=record.get("value"),
        currency=record.get("currency"),
        cost=record.get("cost"),
    )


# --- the fast path of `encode` ------------------------------------------------------------------
# Event fields in the contract's order (as `Event.to_bytes` writes them), each with a check that only
# passes values pydantic would keep as they are: a record with anything else takes the slow path.
# The bytes are those of `Event.to_bytes` (one encoder: `streaming.events.encode_json`).
FAST_TS_MS = (946_684_800_000, 4_102_444_800_000)  # 2000-2100: ms / 1000 as a float rounds to the exact ms


def _is_id(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID


def _is_position(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_arm(value: Any) -> bool:
    return value == "targeted" or value == "control"


def _is_propensity(value: Any) -> bool:
    return type(value) is float and 0.0 < value <= 1.0


def _is_context(value: Any) -> bool:
    if type(value) is not dict:
        return False
    for key, item in value.items():
        kind = type(item)
        if type(key) is not str or not (
            kind is str
            or item is None
            or kind is bool
            or (kind is int and -(2**63) <= item < 2**63)  # orjson's range
            or (kind is float and math.isfinite(item))
        ):
            return False
    return True


OPTIONAL_FIELDS = (
    ("category", _is_id),
    ("ad_id", _is_id),
    ("campaign_id", _is_id),
    ("request_id", _is_id),
    ("slot_id", _is_id),
    ("position", _is_position),
    ("model_version", _is_id),
    ("arm", _is_arm),
    ("propensity", _is_propensity),
)


def _checked(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record as the contract's JSON object (keys in field order, no nulls), or None: take the slow path."""
    if record.get("event_type", "ad_impression") != "ad_impression" or "source" in record:
        return None  # clicks and conversions are few: `to_event` encodes them
    event_id = record.get("event_id") or uuid.uuid4().hex
    user_id, ts = record.get("user_id"), record.get("ts")
    if not (_is_id(event_id) and _is_id(user_id) and _is_id(record.get("ad_id"))):
        return None
    if type(ts) is not int or not FAST_TS_MS[0] <= ts < FAST_TS_MS[1]:
        return None
    data = {"event_id": event_id, "schema_version": SCHEMA_VERSION, "event_type": "ad_impression",
            "user_id": user_id, "ts": format_ts(ts)}  # fmt: skip
    for name, valid in OPTIONAL_FIELDS:
        value = record.get(name)
        if value is not None:
            if not valid(value):
                return None
            data[name] = value
    data["source"] = "serve"
    context = record.get("context")
    if context:  # to_event: `or None`, an empty context is left out
        if not _is_context(context):
            return None
        data["context"] = context
    cost = record.get("cost")
    if cost is not None:
        if type(cost) is not float or not (math.isfinite(cost) and cost >= 0):
            return None
        data["cost"] = cost
    return data
