"""Operations: `/healthz` (the process answers), `/readyz` (Kafka, Redis, catalog, model), `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from serving import metrics
from serving.deps import RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 when catalog, Redis and Kafka are ready (no model = fallback ranking, reported but ready)."""
    report = runtime.readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus text format."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
