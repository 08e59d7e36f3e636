"""The OpenAPI schema as the routes behave: FastAPI's, plus what it cannot see.

The OpenRTB bid route parses its body itself (400 for a bad BidRequest, as exchanges expect, not
FastAPI's 422), so its request schema is `serving.openrtb.BidRequest`'s, added here under
components. Routes declare their own status codes and media types (`responses=` in routes/);
tests/serving/test_fuzz_api.py holds the schema to the answers with schemathesis.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.openrtb import BidRequest

BID_REQUEST_REF = "#/components/schemas/BidRequest"


def truthful_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's schema (built once, then cached on the app as FastAPI does)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
    )
    bid_request = BidRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in bid_request.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components["BidRequest"] = bid_request
    app.openapi_schema = schema
    return schema
