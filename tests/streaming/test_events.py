"""parse_event's and decode_event's fast paths decide every message as the step-by-step path does, and the
msgspec contract's JSON Schema is the published one (no services)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from adloop.settings import PROJECT_ROOT
from streaming.events import (
    DecodedEvent,
    Event,
    InvalidEvent,
    decode_event,
    json_schema,
    parse_event,
    parse_event_stepwise,
)
from tests.support.events import synthetic_events

VALID = {"event_id": "e-1", "schema_version": 1, "event_type": "ad_click", "user_id": "u-1",
         "ts": "2019-11-24T10:00:00.123Z", "ad_id": "ad-1", "price": 2.5, "position": 1}  # fmt: skip
VARIANTS = [
    {},
    {"ts": 1_574_589_600_123},
    {"ts": 1_574_589_600_123.7},
    {"ts": "2019-11-24T12:00:00+02:00"},
    {"ts": "2019-11-24T10:00:00"},  # no zone
    {"ts": "2019-11-24"},
    {"ts": "yesterday"},
    {"ts": True},
    {"ts": None},
    {"ts": 10**30},
    {"ts": "2019-11-24T10:00:00.123456789Z"},
    {"ts": "2019-11-24t10:00:00z"},
    {"ts": "2019-11-24 10:00:00+0200"},
    {"ts": "2016-12-31T23:59:60Z"},
    {"ts": "9999-12-31T23:59:59.999999-01:00"},  # past datetime.max in UTC
    {"ts": -1},
    {"schema_version": 1.0},
    {"schema_version": "1"},
    {"schema_version": True},
    {"schema_version": 2},
    {"event_type": "teleport"},
    {"event_type": "AD_CLICK"},
    {"event_type": None},
    {"event_type": []},
    {"event_type": 5},
    {"ts": [1]},
    {"ad_id": None},
    {"ad_id": ""},
    {"event_type": "search", "ad_id": None},
    {"user_id": ""},
    {"user_id": "u" * 256},
    {"user_id": "u" * 257},
    {"user_id": 42},
    {"price": "1.5"},
    {"price": -1},
    {"price": float("nan")},
    {"price": 10**400},
    {"position": 1.0},
    {"position": 1.5},
    {"position": "2"},
    {"position": True},
    {"propensity": 0},
    {"propensity": 1},
    {"arm": "control"},
    {"arm": "other"},
    {"context": {"page": "home", "n": 3, "x": 1.5, "ok": True, "none": None}},
    {"context": {"nested": {"a": 1}}},
    {"context": []},
    {"unknown_field": 1},
    {"session_id": "s", "item_id": "i", "category": "c", "brand": "b", "campaign_id": "k", "request_id": "r",
     "slot_id": "top", "model_version": "v1", "source": "simulate"},
]  # fmt: skip
RAW = [
    b"",
    b"null",
    b"[]",
    b'"text"',
    b'{"event_id": "x", ',
    b'{"event_id": "\xff\xfe"}',
    b"\xef\xbb\xbf" + json.dumps(VALID).encode(),  # BOM
    b"  " + json.dumps(VALID).encode() + b"\n",
    json.dumps(VALID).replace('"e-1"', '"e-\\ud800"').encode(),  # lone surrogate escape
    json.dumps(VALID).replace('"u-1"', '"\\u00e9\\u732b"').encode(),
    json.dumps(VALID)[:-1].encode() + b', "user_id": "u-2"}',  # duplicate key: the last one wins
    json.dumps(VALID).replace("2.5", "NaN").encode(),
    json.dumps(VALID).replace("2.5", "Infinity").encode(),
    json.dumps(VALID).replace("2.5", "2.5e400").encode(),
    json.dumps(VALID).replace("2.5", "-0.0").encode(),
]


def _outcome(parse, raw: bytes) -> tuple[str, object]:
    try:
        event = parse(raw)
    except InvalidEvent as error:
        return "invalid", (error.reason, error.detail)
    return "event", (event, event.model_dump())


def _corpus() -> list[bytes]:
    variants = [json.dumps({k: v for k, v in {**VALID, **change}.items() if v is not None or k not in change},
                           allow_nan=True).encode() for change in VARIANTS]  # fmt: skip
    variants += [json.dumps({**VALID, **change}).encode() for change in VARIANTS if None in change.values()]
    return [*variants, *RAW, *(event.to_bytes() for event in synthetic_events(300, users=7, seed=8))]


@pytest.mark.parametrize("raw", _corpus())
def test_the_fast_path_decides_as_the_stepwise_path(raw: bytes) -> None:
    assert _outcome(parse_event, raw) == _outcome(parse_event_stepwise, raw)


def test_the_corpus_has_both_fates() -> None:
    fates = [_outcome(parse_event, raw)[0] for raw in _corpus()]
    assert fates.count("event") > 300 and fates.count("invalid") > 20


def test_a_round_trip_keeps_the_event() -> None:
    for event in synthetic_events(50, users=3, seed=2):
        assert parse_event(event.to_bytes()) == event
        assert isinstance(parse_event(event.to_bytes()), Event)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"event_type": []}, "unknown_event_type"),
        ({"ts": 10**30}, "schema"),
        ({"ts": -(10**30)}, "schema"),
        ({"ts": "9999-12-31T23:59:59-01:00"}, "schema"),
    ],
)
def test_poison_values_are_dead_lettered_not_raised(change: dict, reason: str) -> None:
    """These used to raise TypeError / OverflowError out of parse_event and stop the consumer."""
    with pytest.raises(InvalidEvent) as caught:
        parse_event(json.dumps({**VALID, **change}).encode())
    assert caught.value.reason == reason
    with pytest.raises(InvalidEvent) as caught:
        decode_event(json.dumps({**VALID, **change}).encode())
    assert caught.value.reason == reason


def _decoded_outcome(parse, raw: bytes) -> tuple[str, object]:
    """As `_outcome`, with the event as its fields' reprs (1 and 1.0, or two enum types, would compare equal).
    `ts` is compared in milliseconds, what the consumer reads (`ts_ms`): past 6 fractional digits msgspec rounds
    to the microsecond where pydantic truncates (`test_sub_microsecond_digits`)."""
    try:
        event = parse(raw)
    except InvalidEvent as error:
        return "invalid", (error.reason, error.detail)
    fields = msgspec.structs.asdict(event) if isinstance(event, DecodedEvent) else dict(event)
    return "event", {name: repr(value) for name, value in {**fields, "ts": event.ts_ms}.items()}


@pytest.mark.parametrize("raw", _corpus())
def test_the_msgspec_path_decides_as_the_stepwise_path(raw: bytes) -> None:
    assert _decoded_outcome(decode_event, raw) == _decoded_outcome(parse_event_stepwise, raw)


def test_the_msgspec_path_takes_the_common_case() -> None:
    """Valid messages do not fall back to pydantic (else the fast path would be correct but slow)."""
    decoder = msgspec.json.Decoder(DecodedEvent)
    for event in synthetic_events(300, users=7, seed=8):
        decoded = decoder.decode(event.to_bytes())
        assert decoded.ts_ms == event.ts_ms and decoded.event_type == event.event_type


def test_sub_microsecond_digits() -> None:
    raw = json.dumps({**VALID, "ts": "2019-11-24T10:00:00.9999999Z"}).encode()
    assert decode_event(raw).ts.microsecond == 0 and parse_event(raw).ts.microsecond == 999_999
    assert decode_event(raw).ts_ms == parse_event(raw).ts_ms


def test_decode_event_limits_the_size() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(json.dumps(VALID).encode(), max_bytes=10)
    assert caught.value.reason == "oversized"


_KEYWORDS = {"type", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "enum", "const", "additionalProperties"}  # fmt: skip


def _sort_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _canonical(schema: dict[str, Any]) -> dict[str, Any]:
    """What a JSON Schema accepts, without titles, descriptions, defaults or how it is spelled ($ref, const)."""
    defs = schema.get("$defs", {})

    def alternatives(node: dict[str, Any]) -> list[Any]:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        if "anyOf" in node:
            return sorted((a for n in node["anyOf"] for a in alternatives(n)), key=_sort_key)
        kept = {k: v for k, v in node.items() if k in _KEYWORDS}
        if "const" in kept:
            kept["enum"] = [kept.pop("const")]
        if "enum" in kept:
            kept["enum"] = sorted(kept["enum"], key=_sort_key)
            kept.pop("type", None)  # implied by the values
        if isinstance(kept.get("additionalProperties"), dict):
            kept["additionalProperties"] = alternatives(kept["additionalProperties"])
        return [kept]

    root = defs[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
    return {
        "properties": {name: alternatives(p) for name, p in root["properties"].items()},
        "required": sorted(root.get("required", [])),
        "additionalProperties": root.get("additionalProperties"),
    }


def test_the_msgspec_contract_has_the_published_schema() -> None:
    published = json.loads((PROJECT_ROOT / "docs" / "events.schema.json").read_text(encoding="utf-8"))
    assert published == json_schema()  # (also checked by `adloop events schema --check`)
    assert _canonical(msgspec.json.schema(DecodedEvent)) == _canonical(published)
    assert list(DecodedEvent.__struct_fields__) == list(Event.model_fields)
