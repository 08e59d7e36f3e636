"""`POST /v1/admin/reload`: re-read the catalog and the promoted model without a restart (bearer token)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from serving.catalog import CatalogError
from serving.deps import TOKEN_RESPONSES, AdminDep, RuntimeDep
from serving.http import JSONRoute

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    route_class=JSONRoute,
    responses=TOKEN_RESPONSES,
)


@router.post("/reload", responses={422: {"description": "The catalog or model failed to load; the old ones serve."}})
def reload(runtime: RuntimeDep) -> dict:
    """Swap in the current catalog file and promoted model; requests in flight finish on the old ones. Every
    other worker and replica following the same registry reloads on its next poll (ADLOOP_MODEL_POLL_S)."""
    try:
        return runtime.reload(everywhere=True)
    except (CatalogError, OSError) as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"reload failed, old state kept: {error}") from error
