"""hypothesis on the OpenRTB parser: any body gives a BidRequest or a ValidationError, and a parsed one maps
to a selection request without raising (serving.openrtb)."""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from serving.openrtb import BidRequest, to_selection

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
sizes = st.integers(-5, 2000) | values
imps = st.fixed_dictionaries(
    {"id": st.text(max_size=5) | values},
    optional={
        "banner": st.fixed_dictionaries(
            {},
            optional={
                "w": sizes,
                "h": sizes,
                "format": st.lists(st.fixed_dictionaries({"w": sizes, "h": sizes}), max_size=3),
            },
        )
        | values,
        "native": st.fixed_dictionaries({"request": st.text(max_size=40) | values}) | values,
        "video": values,
        "bidfloor": st.floats(allow_nan=False) | values,
        "bidfloorcur": st.sampled_from(["USD", "EUR"]) | values,
        "pmp": st.fixed_dictionaries(
            {},
            optional={
                "private_auction": values,
                "deals": st.lists(st.fixed_dictionaries({"id": st.text(max_size=4), "bidfloor": values}), max_size=2),
            },
        ),
    },
)
requests = st.fixed_dictionaries(
    {"id": st.text(max_size=300) | values, "imp": st.lists(imps, max_size=4) | values},
    optional={name: values for name in ("site", "app", "device", "user", "tmax", "cur", "bcat", "badv", "test", "at")},
)


def _parse(raw: bytes) -> BidRequest | None:
    try:
        return BidRequest.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        return None


@BOUNDED
@given(requests)
def test_bid_request_shaped_bodies_parse_or_fail_validation(body: dict) -> None:
    req = _parse(orjson.dumps(body))
    if req is not None:
        selection, shapes = to_selection(req)
        assert {s.slot_id for s in selection.slots} == set(shapes) <= {i.id for i in req.imp}
        assert len(selection.user_id) <= 256 and len(selection.request_id) <= 256


@BOUNDED
@given(st.binary(max_size=2048))
def test_any_bytes_parse_or_fail_validation(raw: bytes) -> None:
    _parse(raw)
