"""The dependency every route declares: ``Depends(require(Permission.X))``.

It authenticates the request with the app's :class:`Authenticator`
(``app.state.authenticator``), answers 401 when nobody is authenticated
and 403 when the principal's roles do not grant the permission, and puts
the principal on ``request.state.principal`` for auditing.  The permission
a route needs is kept on the dependency (``.permission``), so a test can
walk every route and prove none is unprotected.
"""

from __future__ import annotations

from typing import Literal, Protocol

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict

from dicomweb_api.security.permissions import Permission, Role, permissions_of


class Principal(BaseModel):
    """An authenticated caller."""

    model_config = ConfigDict(frozen=True)

    subject: str
    roles: frozenset[Role]
    method: Literal["oidc", "token", "anonymous"]


class AuthenticationError(Exception):
    """No valid credentials (the message says why: expired, bad signature…)."""


class Authenticator(Protocol):
    async def authenticate(self, request: Request) -> Principal:
        """The caller of ``request``; raises :class:`AuthenticationError`."""
        ...


class Require:
    """The dependency ``require(permission)`` returns; FastAPI calls it per request."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(self, request: Request) -> Principal:
        authenticator: Authenticator = request.app.state.authenticator
        try:
            principal = await authenticator.authenticate(request)
        except AuthenticationError as exc:
            raise HTTPException(
                status_code=401, detail=str(exc), headers={"WWW-Authenticate": 'Bearer realm="pacs"'}
            ) from exc
        if self.permission not in permissions_of(principal.roles):
            raise HTTPException(status_code=403, detail=f"{self.permission.value} permission required")
        request.state.principal = principal
        return principal


def require(permission: Permission) -> Require:
    """``Depends(require(Permission.READ))``, or ``Annotated[Principal, Depends(require(...))]``."""
    return Require(permission)
