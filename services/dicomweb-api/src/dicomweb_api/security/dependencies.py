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

import asyncpg
from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict

from dicomweb_api.security.permissions import Permission, Role, permissions_of
from pacs_common.db.pool import is_connection_error


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


def _database_unavailable(exc: BaseException) -> bool:
    """PostgreSQL unreachable, restarting or shutting down (not a bad query); asyncpg's
    InternalClientError is what a pooled connection the server dropped mid-use can raise."""
    return is_connection_error(exc) or isinstance(exc, asyncpg.exceptions.InternalClientError)


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
        except Exception as exc:
            if not _database_unavailable(exc):
                raise
            # API tokens are checked in PostgreSQL: while it is unreachable, "retry later".
            raise HTTPException(
                status_code=503, detail="credentials cannot be checked now", headers={"Retry-After": "2"}
            ) from exc
        if self.permission not in permissions_of(principal.roles):
            raise HTTPException(status_code=403, detail=f"{self.permission.value} permission required")
        request.state.principal = principal
        return principal


def require(permission: Permission) -> Require:
    """``Depends(require(Permission.READ))``, or ``Annotated[Principal, Depends(require(...))]``."""
    return Require(permission)
