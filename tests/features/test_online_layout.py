"""Feast's Redis layout written without protobuf objects: byte for byte what Feast and protobuf write (no services)."""

from __future__ import annotations

import math
import random

import pytest

from features.aggregates import UserState, apply_user, user_features
from features.online import (
    VALUE_ENCODERS,
    FeastLayout,
    ViewLayout,
    _decode_value,
    _entity_key_prefix,
    encode_timestamp,
    encode_value,
    reference_decode,
    reference_key,
    reference_timestamp,
    reference_value,
)
from tests.support.batch_features import view_kinds
from tests.support.events import synthetic_events

INT64_EDGES = [0, 1, 127, 128, 255, 300, 4095, 4096, 16_383, 16_384, 2**31 - 1, 2**31, 2**63 - 1, -1, -128, -(2**63)]
FLOAT_EDGES = [0.0, -0.0, 1.0, 0.05, -3.5, 1e-310, 1e308, math.inf, -math.inf]
STRINGS = ["", "a", "user-1", "é", "猫" * 50, "x" * 127, "x" * 128, "x" * 20_000, "\x00"]


def _values(kind: str, rng: random.Random) -> list:
    def integer() -> int:
        return rng.choice([rng.randrange(200), rng.randrange(2**40), -rng.randrange(2**62), rng.choice(INT64_EDGES)])

    def text() -> str:
        random_text = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(9)))
        return rng.choice([rng.choice(STRINGS), random_text])

    def real() -> float:
        return rng.choice([rng.random(), rng.uniform(-1e9, 1e9), rng.choice(FLOAT_EDGES), float(rng.randrange(9))])

    one = {"Int64": integer, "Float64": real, "String": text}
    if kind in one:
        return [None, *(INT64_EDGES if kind == "Int64" else FLOAT_EDGES if kind == "Float64" else STRINGS),
                *(one[kind]() for _ in range(300))]  # fmt: skip
    element = one[kind[len("Array(") : -1]]
    lists = [[element() for _ in range(rng.randrange(40))] for _ in range(300)]
    return [None, [], *([element()] for _ in range(50)), *lists]


@pytest.mark.parametrize("kind", sorted(VALUE_ENCODERS))
def test_values_encode_to_the_bytes_protobuf_writes(kind: str) -> None:
    for value in _values(kind, random.Random(kind)):
        assert encode_value(kind, value) == reference_value(kind, value), (kind, value)


@pytest.mark.parametrize("kind", sorted(VALUE_ENCODERS))
def test_values_decode_as_protobuf_parses_them(kind: str) -> None:
    """The reader's wire-format shortcut for scalars gives what protobuf's parse gives, NaN and int64 edges too."""
    for value in _values(kind, random.Random(kind + "decode")):
        raw = reference_value(kind, value)
        got, want = _decode_value(raw), reference_decode(raw)
        assert type(got) is type(want) and (got == want or (got != got and want != want)), (kind, value, got, want)
    assert _decode_value(None) is None and _decode_value(b"") is None


def test_nan_encodes_like_protobuf() -> None:
    assert encode_value("Float64", math.nan) == reference_value("Float64", math.nan)
    assert encode_value("Array(Float64)", [math.nan, 1.0]) == reference_value("Array(Float64)", [math.nan, 1.0])


def test_timestamps_encode_like_protobuf() -> None:
    rng = random.Random(3)
    samples = [0, 1, 999, 1000, 1001, 1_511_539_200_000, 1_700_000_000_123, -1, -1500]
    for ts_ms in [*samples, *(rng.randrange(-(2**41), 2**42) for _ in range(2000))]:
        assert encode_timestamp(ts_ms) == reference_timestamp(ts_ms), ts_ms


def test_entity_keys_equal_feasts_serialization() -> None:
    layout = FeastLayout("adloop", {"v": _view("v", "user_id", {})})
    for entity in ["", "1", "user-42", "é猫", "x" * 300, "1017290"]:
        assert layout.key("v", entity) == reference_key("user_id", entity, b"adloop")


def test_a_real_row_encodes_like_the_protobuf_messages() -> None:
    """Every user_activity feature of folded states, through `encode` and through protobuf messages."""
    states: dict[str, UserState] = {}
    for event in synthetic_events(600, users=5, seed=4):
        states[event.user_id] = apply_user(states.get(event.user_id) or UserState(), event)
    rows = [user_features(state) for state in states.values()]
    kinds = view_kinds("user_activity")
    view = _view("user_activity", "user_id", kinds)
    layout = FeastLayout("adloop", {view.name: view})
    for row in [*rows, {}]:  # {}: every feature missing
        encoded = layout.encode(view.name, 1_700_000_000_250, row)
        expected = {view.ts_field: reference_timestamp(1_700_000_000_250)}
        for name, field in zip(view.features, view.fields, strict=True):
            expected[field] = reference_value(kinds[name], row.get(name))
        assert encoded == expected
        assert list(encoded) == [view.ts_field, *view.fields]


def _view(name: str, join_key: str, kinds: dict[str, str]) -> ViewLayout:
    return ViewLayout(
        name=name,
        join_key=join_key,
        features=tuple(kinds),
        kinds=tuple(kinds.values()),
        fields=tuple(f"{name}:{feature}".encode() for feature in kinds),
        ts_field=f"_ts:{name}".encode(),
        key_prefix=_entity_key_prefix(join_key),
    )
