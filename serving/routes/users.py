"""`GET /v1/users/{user_id}/features` (a token: personal data) and `DELETE /v1/users/{user_id}` (erasure, admin)."""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, HTTPException, Path, status
from starlette.concurrency import run_in_threadpool

from outcomes.erasure import forget_user
from serving.deps import TOKEN_RESPONSES, RuntimeDep, SettingsDep, require_admin, require_users_reader
from serving.http import JSONRoute
from serving.redis_lazy import open_redis
from serving.selection_types import arm_of

router = APIRouter(prefix="/v1", tags=["users"], route_class=JSONRoute, responses=TOKEN_RESPONSES)
UserId = Annotated[str, Path(min_length=1, max_length=256, pattern="^[^/]+$")]
UNAVAILABLE = {503: {"description": "The online store is unreachable."}}


@router.get("/users/{user_id}/features", dependencies=[Depends(require_users_reader)], responses=UNAVAILABLE)
def user_features(runtime: RuntimeDep, user_id: UserId) -> dict:
    """The user's online features (empty for an unknown user) and their arm (bearer token: users or admin)."""
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


@router.delete("/users/{user_id}", dependencies=[Depends(require_admin)], responses=UNAVAILABLE)
async def forget(settings: SettingsDep, user_id: UserId) -> dict[str, Any]:
    """Erase the user (online state, feature rows, outcome events) and leave a tombstone; says what was removed."""
    # A client of its own: the request path's has a budget of milliseconds and no retries.
    client = open_redis(settings, timeout_s=5.0)  # on a cluster: opened in the thread, its failure a 503
    try:  # off the event loop: it rewrites files and waits on DuckDB's lock
        return await run_in_threadpool(forget_user, settings, client, user_id)
    except (redis.RedisError, OSError) as error:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"erasure incomplete: {type(error).__name__}"
        ) from None
    finally:
        client.close()
