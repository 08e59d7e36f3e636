"""The HTTP edge (serving.http): never a 500 for bad input, JSON only, limits before work, bounded 4xx answers."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serving.http import JSONRoute
from serving.schemas import MAX_CONTEXT_KEYS
from tests.support.serving import MemoryReader

SLOTS = [{"slot_id": "top", "format": "banner_728x90"}]
JSON = {"content-type": "application/json"}
BID = b'{"id": "r1", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}]}'


@pytest.fixture
def client(make_app):
    app, _ = make_app(reader=MemoryReader(), max_body_bytes=4096)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": "u", "slots": [{"slot_id": "a", "format": "native"}], "context": {"x": NaN}}',
        b'{"user_id": "u", "slots": [{"slot_id": "a", "format": "native"}], "context": {"x": Infinity}}',
        b'{"user_id": "u", "slots": [{"slot_id": "a", "format": "native", "position": -Infinity}]}',
        b'{"user_id": "\\ud800", "slots": [{"slot_id": "a", "format": "native"}]}',
        b'{"user_id": "u\\udfff", "slots": []}',
        b'{"user_id": "\xff\xfe", "slots": []}',
        '{"user_id": "u", "slots": [{"slot_id": "a", "format": "native"}]}'.encode("utf-16"),
        b"\x00\x01\x02",
        b"[]",
        b"null",
        b'"text"',
        b"{" * 2000,
    ],
)
def test_bad_json_is_a_4xx_naming_the_problem_never_a_500(client, body: bytes) -> None:
    for path in ("/v1/select", "/openrtb/2.6/bid"):
        response = client.post(path, content=body, headers=JSON)
        assert response.status_code in (400, 422), (path, body[:40], response.status_code, response.text[:200])
        assert response.json()["detail"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-16", "application/xml"],
)
def test_only_utf8_json_is_accepted(client, content_type: str) -> None:
    body = b'{"user_id": "u", "slots": [{"slot_id": "a", "format": "native"}]}'
    for path in ("/v1/select", "/openrtb/2.6/bid"):
        response = client.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == 415, (path, content_type)
    assert client.post(
        "/v1/select", content=body, headers={"content-type": "application/json; charset=UTF-8"}
    ).is_success
    assert client.post("/v1/select", content=body).status_code == 415  # a body without a content type


def test_a_body_over_the_cap_is_413_before_it_is_read(client) -> None:
    big = b'{"user_id": "u", "slots": [], "pad": "' + b"x" * 5000 + b'"}'
    for path in ("/v1/select", "/openrtb/2.6/bid"):
        assert client.post(path, content=big, headers=JSON).status_code == 413

    def chunks():  # no Content-Length: the cap applies to the bytes as they arrive
        yield b'{"user_id": "u", "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    assert client.post("/v1/select", content=chunks(), headers=JSON).status_code == 413


def test_a_422_echoes_a_bounded_part_of_the_input(make_app) -> None:
    app, _ = make_app(reader=MemoryReader())  # the default cap (256 KiB)
    body = {"user_id": "u" * 100_000, "slots": [{"slot_id": "s" * 40_000, "format": "nope"}] * 2, "extra": "e" * 60_000}
    with TestClient(app) as client:
        response = client.post("/v1/select", json=body)
    assert response.status_code == 422
    assert len(response.content) < 4000  # the body was ~240 KB
    fields = {tuple(e["loc"][1:]) for e in response.json()["detail"]}
    assert ("user_id",) in fields and ("extra",) in fields


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"slots": [{"slot_id": "a", "format": "native", "position": False}]}, "position"),
        ({"slots": [{"slot_id": "a", "format": "native", "count": True}]}, "count"),
        ({"slots": [{"slot_id": "a", "format": "native", "count": "2"}]}, "count"),
        ({"slots": [{"slot_id": "a", "format": "native", "count": 1.5}]}, "count"),
        ({"slots": [{"slot_id": f"s{i}", "format": "native"} for i in range(11)]}, "slots"),
        ({"slots": SLOTS, "context": {f"k{i}": i for i in range(MAX_CONTEXT_KEYS + 1)}}, "context"),
        ({"slots": SLOTS, "context": {"k" * 65: 1}}, "context"),
        ({"slots": SLOTS, "context": {"page": "p" * 257}}, "page"),
        ({"slots": SLOTS, "context": {"page": [1]}}, "page"),
        ({"slots": SLOTS, "candidate_ad_ids": ["a"] * 1001}, "candidate_ad_ids"),
        ({"slots": SLOTS, "exclude_ad_ids": ["a"] * 1001}, "exclude_ad_ids"),
        ({"slots": SLOTS, "user_id": 7}, "user_id"),
    ],
)
def test_strict_types_and_bounds_name_the_field(client, body: dict, field: str) -> None:
    response = client.post("/v1/select", json={"user_id": "u", **body})
    assert response.status_code == 422, response.text[:300]
    assert field in str(response.json()["detail"])


def test_context_keeps_scalars_as_given(make_app) -> None:
    app, _ = make_app(reader=MemoryReader())
    seen = []
    with TestClient(app) as client:
        original = app.state.runtime.pipeline.run

        async def spy(request, **kwargs):
            seen.append(request.context)
            return await original(request, **kwargs)

        app.state.runtime.pipeline.run = spy
        context = {"device": "mobile", "flag": True, "n": 3, "x": 0.5, "gone": None}
        assert client.post("/v1/select", json={"user_id": "u", "slots": SLOTS, "context": context}).is_success
    assert seen == [{"device": "mobile", "flag": True, "n": 3, "x": 0.5}]
    assert type(seen[0]["flag"]) is bool and type(seen[0]["n"]) is int


def test_every_route_parses_json_strictly(make_app) -> None:
    """A router added without `route_class=JSONRoute` would take NaN and UTF-16 again."""
    app, _ = make_app()
    routes = list(_api_routes(app.routes))
    assert len(routes) > 10 and all(isinstance(r, JSONRoute) for r in routes), [
        r.path for r in routes if not isinstance(r, JSONRoute)
    ]


def _api_routes(routes):
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router
            yield from _api_routes(route.original_router.routes)
        elif isinstance(route, APIRoute):
            yield route


def test_tokens_answer_401_without_and_403_with_a_wrong_one(client) -> None:
    for method, path in (("GET", "/v1/users/u-1/features"), ("POST", "/v1/admin/reload"), ("DELETE", "/v1/users/u-1")):
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.request(method, path, headers={"Authorization": "Basic c2VjcmV0"}).status_code == 401
    features = client.get("/v1/users/u-1/features", headers={"Authorization": "Bearer secret"})
    assert features.status_code == 200 and features.json()["known"] is False


def test_a_users_token_reads_features_but_cannot_erase(make_app) -> None:
    app, _ = make_app(reader=MemoryReader(), users_token="reader")
    with TestClient(app) as client:
        reader = {"Authorization": "Bearer reader"}
        assert client.get("/v1/users/u-1/features", headers=reader).status_code == 200
        assert client.get("/v1/users/u-1/features", headers={"Authorization": "Bearer secret"}).status_code == 403
        assert client.delete("/v1/users/u-1", headers=reader).status_code == 403


def test_secrets_are_not_in_the_settings_repr(make_app) -> None:
    _, settings = make_app(users_token="reader-token")
    text = repr(settings) + str(settings.model_dump())
    for secret in ("secret", "reader-token", "test-signing-secret"):
        assert f"'{secret}'" not in text


@pytest.mark.parametrize(
    "query",
    [
        {"to": "0.5"},
        {"from": "2026-01-01"},
        {"to": "2026-13-01T00:00:00Z"},
        {"group_by": "arm,nope"},
        {"group_by": ""},
        {"arm": "both"},
        {"confidence": "true"},
    ],
)
def test_outcomes_queries_are_checked(client, query: dict) -> None:
    assert client.get("/v1/outcomes", params=query).status_code == 422


def test_metrics_are_text(client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert client.app.openapi()["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}


def test_openrtb_body_schema_is_the_bid_request(client) -> None:
    schema = client.app.openapi()
    body = schema["paths"]["/openrtb/2.6/bid"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/BidRequest"}
    bid_request = schema["components"]["schemas"]["BidRequest"]
    assert {"id", "imp", "site", "app", "device", "user", "tmax", "bcat", "badv"} <= set(bid_request["properties"])
    for path in ("/v1/select", "/openrtb/2.6/bid"):
        assert {"413", "415"} <= set(schema["paths"][path]["post"]["responses"])
    assert client.post("/openrtb/2.6/bid", content=BID, headers=JSON).status_code in (200, 204)
