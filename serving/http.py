"""The HTTP edge of every route: JSON only (UTF-8, strict), bounded error answers, never a 500 for bad input.

- `JSONRoute` (every router's `route_class`): a request with a body must say `application/json`
  (charset, if given, UTF-8), else 415; the body is parsed with orjson, which rejects what the stdlib's
  `json.loads` lets through and the rest of the path cannot handle: `NaN` / `Infinity` literals, lone
  surrogate escapes (`"\\ud800"`: not encodable to UTF-8, so not loggable), invalid UTF-8 and
  UTF-16/32 documents (json.loads sniffs the encoding).
- `validation_error`: the 422 handler. FastAPI's own echoes each error's whole `input` (a 4.7 MB bad
  body came back as 4.3 MB) and fails on input it cannot serialise; this one keeps the first
  `MAX_ERRORS` errors, each with the location, the message and at most a short scalar preview.
- The body size cap is Starlette's (`FastAPI(max_body_size=...)`): 413 from Content-Length before a
  byte is read, or as soon as a streamed body passes the cap.
"""

from __future__ import annotations

import email.message
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

MAX_ERRORS = 20  # errors listed in a 422 (the count of all is given)
MAX_TEXT = 80  # characters of a string kept in a location, message or input preview


class Problem(BaseModel):
    """An error answer: `detail` says what is wrong (a text, or a list of errors naming fields)."""

    detail: str | list[dict[str, Any]]


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError as error:
                # FastAPI turns a json.JSONDecodeError into a 422 "json_invalid" naming the position;
                # orjson's document may not be text (bad UTF-8): keep it out of the error.
                raise json.JSONDecodeError(_text(error.msg), "", min(error.pos, len(body))) from None
        return self._json


BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"description": "The body is over the size limit (ADLOOP_MAX_BODY_BYTES).", "model": Problem},
    415: {"description": "The body is not UTF-8 JSON (Content-Type: application/json).", "model": Problem},
}


class JSONRoute(APIRoute):
    """Routes of adloop: 415 for a body that is not UTF-8 JSON, orjson parsing (see the module doc).
    Routes that take a body document the 413 and 415 answers."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if set(kwargs.get("methods") or ()) & {"POST", "PUT", "PATCH"}:
            kwargs["responses"] = {**BODY_RESPONSES, **(kwargs.get("responses") or {})}
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            problem = unsupported_content(request.headers)
            if problem is not None:
                return JSONResponse({"detail": problem}, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE)
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return route_handler


def unsupported_content(headers: Any) -> str | None:
    """Why a request's body cannot be taken (None: no body, or UTF-8 JSON)."""
    has_body = headers.get("content-length", "0") not in ("0", "") or "transfer-encoding" in headers
    if not has_body:
        return None
    value = headers.get("content-type")
    if not value:
        return "a body needs Content-Type: application/json"
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_type() != "application/json":
        return f"only application/json is accepted, not {_text(message.get_content_type())}"
    charset = message.get_param("charset")
    if isinstance(charset, str) and charset.lower().replace("-", "") != "utf8":
        return f"only UTF-8 JSON is accepted, not charset={_text(charset)}"
    return None


async def validation_error(request: Request, error: Exception) -> JSONResponse:
    """422 naming each field, with at most a short preview of the input (bounded, always serialisable)."""
    assert isinstance(error, RequestValidationError)
    return JSONResponse({"detail": bounded_errors(error.errors())}, status.HTTP_422_UNPROCESSABLE_CONTENT)


def bounded_errors(errors: Any) -> list[dict[str, Any]]:
    """The first MAX_ERRORS of pydantic's errors, each bounded (`_bounded`); a last entry counts the rest."""
    errors = list(errors)
    out = [_bounded(e) for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"{len(errors) - MAX_ERRORS} more errors not listed", "type": "too_many_errors"})
    return out


def _bounded(error: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loc": [part if isinstance(part, int) else _text(str(part)) for part in error.get("loc", ())][:16],
        "msg": _text(str(error.get("msg", "")), 300),
        "type": _text(str(error.get("type", ""))),
    }
    preview = _preview(error.get("input"))
    if preview is not None:
        out["input"] = preview
    return out


def _preview(value: Any) -> Any:
    """A scalar input as given (strings cut to MAX_TEXT); objects and lists are not echoed."""
    if isinstance(value, bool | int) and abs(value) < 2**53:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str):
        return _text(value)
    return None


def _text(value: str, limit: int = MAX_TEXT) -> str:
    """At most `limit` characters, encodable to UTF-8 (lone surrogates become '?')."""
    cut = value[:limit] + ("..." if len(value) > limit else "")
    return cut.encode("utf-8", "replace").decode("utf-8")
