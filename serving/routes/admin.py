"""`POST /v1/admin/reload`: re-read the catalog and the promoted model without a restart (bearer token)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from serving.catalog import CatalogError
from serving.deps import AdminDep, RuntimeDep

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/reload")
def reload(runtime: RuntimeDep) -> dict:
    """Swap in the current catalog file and promoted model; requests in flight finish on the old ones. Every
    other worker and replica following the same registry reloads on its next poll (ADLOOP_MODEL_POLL_S)."""
    try:
        return runtime.reload(everywhere=True)
    except (CatalogError, OSError) as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"reload failed, old state kept: {error}") from error
