"""Dependencies of the routes, as `Annotated` aliases.

They are `async def` on purpose: FastAPI runs a sync dependency in the thread pool, one hop per
dependency per request, which costs more than the dependency itself; these only read `app.state`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from adloop.settings import Settings
from serving.notices import NoticeLedger
from serving.runtime import Runtime

_bearer = HTTPBearer(auto_error=False)


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_signing_secret(request: Request) -> bytes:
    return request.app.state.signing_secret


async def get_notices(request: Request) -> NoticeLedger:
    return request.app.state.notices


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SigningSecretDep = Annotated[bytes, Depends(get_signing_secret)]
NoticesDep = Annotated[NoticeLedger, Depends(get_notices)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check_token(expected: SecretStr | None, credentials: HTTPAuthorizationCredentials | None, what: str) -> None:
    """401 without a bearer token, 403 with a wrong one (or when no token is configured)."""
    if expected is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{what} is disabled: no token is configured")
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    given, wanted = credentials.credentials.encode("utf-8", "replace"), expected.get_secret_value().encode()
    if not hmac.compare_digest(given, wanted):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the bearer token is not valid here")


async def require_admin(settings: SettingsDep, credentials: BearerDep) -> None:
    _check_token(settings.admin_token, credentials, "admin (ADLOOP_ADMIN_TOKEN)")


async def require_users_reader(settings: SettingsDep, credentials: BearerDep) -> None:
    """Per-user features are personal data: the users token, else the admin token."""
    _check_token(settings.users_token or settings.admin_token, credentials, "user reads (ADLOOP_USERS_TOKEN)")


AdminDep = Depends(require_admin)
UsersReaderDep = Depends(require_users_reader)
# The answers of a route behind a token, for its OpenAPI entry.
TOKEN_RESPONSES: dict[int | str, dict] = {
    401: {"description": "No bearer token."},
    403: {"description": "A wrong bearer token, or no token configured on the server."},
}
