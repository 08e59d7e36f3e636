"""Dependencies of the routes, as `Annotated` aliases.

They are `async def` on purpose: FastAPI runs a sync dependency in the thread pool, one hop per
dependency per request, which costs more than the dependency itself; these only read `app.state`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adloop.settings import Settings
from serving.runtime import Runtime

_bearer = HTTPBearer(auto_error=False)


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def require_admin(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    if not settings.admin_token:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin is disabled: set ADLOOP_ADMIN_TOKEN")
    if credentials is None or not hmac.compare_digest(credentials.credentials, settings.admin_token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


AdminDep = Depends(require_admin)
