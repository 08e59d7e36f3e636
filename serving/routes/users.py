"""`GET /v1/users/{user_id}/features`: what the request path reads for a user."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from serving.deps import RuntimeDep
from serving.selection import arm_of

router = APIRouter(prefix="/v1", tags=["users"])


@router.get("/users/{user_id}/features")
def user_features(runtime: RuntimeDep, user_id: Annotated[str, Path(min_length=1, max_length=256)]) -> dict:
    """The user's online features (empty for an unknown user) and their arm."""
    try:
        features = runtime.reader.user(user_id)
    except Exception as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"online store unavailable: {error}") from error
    config = runtime.selector.config
    return {
        "user_id": user_id,
        "known": bool(features),
        "features": features,
        "arm": arm_of(user_id, share=config.control_share, salt=config.control_salt),
    }
