"""Operations: `/healthz` (the process answers), `/readyz` (Kafka, Redis, catalog, model), `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from serving import metrics
from serving.deps import RuntimeDep
from serving.http import JSONRoute

router = APIRouter(tags=["operations"], route_class=JSONRoute)


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: the report says which part is missing."}})
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 when catalog, Redis and Kafka are ready (no model = fallback ranking, reported but ready)."""
    report = runtime.readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."}},
)
def prometheus_metrics() -> Response:
    """Prometheus text format."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
