"""REST endpoints of users, roles, API tokens and the audit log (mounted
under ``/api/v1``; all need :attr:`Permission.ADMIN`).

Changes of users and tokens, and every read of the audit log, are audited.
The routes use ``app.state.context`` (the pool) and ``app.state.audit``
(a :class:`~pacs_common.audit.AuditLog`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security.audit import get_audit_log, http_actor
from dicomweb_api.security.dependencies import Principal, require
from dicomweb_api.security.permissions import ROLE_PERMISSIONS, Permission, Role
from dicomweb_api.security.tokens import RolesNotHeldError, TokenRecord, TokenStore, UnknownUserError
from dicomweb_api.security.users import (
    USERNAME_PATTERN,
    UserCreate,
    UserExistsError,
    UserPublic,
    UserStore,
    UserUpdate,
)
from pacs_common.audit import (
    AuditAction,
    AuditEvent,
    AuditEventId,
    AuditLog,
    AuditObject,
    AuditOutcome,
    AuditQuery,
    fhir_bundle,
)

__all__ = ["FHIR_JSON", "RoleInfo", "TokenCreate", "TokenCreated", "create_security_router"]

FHIR_JSON: Final = "application/fhir+json"

Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]
Context = Annotated[ApiContext, Depends(get_context)]
Audit = Annotated[AuditLog, Depends(get_audit_log)]
Username = Annotated[str, Path(pattern=USERNAME_PATTERN)]


class RoleInfo(BaseModel):
    name: Role
    permissions: list[Permission]


class TokenCreate(BaseModel):
    username: str = Field(pattern=USERNAME_PATTERN)
    name: str = Field(min_length=1, max_length=200)
    # None: all the user's roles (and later none they lose).
    roles: list[Role] | None = None
    # None: never expires (until revoked).
    expires_at: datetime | None = None


class TokenCreated(TokenRecord):
    """The new token, with its secret: shown this once, never stored."""

    secret: str


async def _audit_change(
    audit: AuditLog,
    principal: Principal,
    request: Request,
    *,
    action: AuditAction,
    objects: list[AuditObject],
    details: dict[str, Any],
) -> None:
    await audit.record(
        AuditEventId.SECURITY_ALERT,
        action,
        AuditOutcome.SUCCESS,
        actor=http_actor(principal, request),
        objects=objects,
        details=details,
    )


def create_security_router() -> APIRouter:
    router = APIRouter()
    _user_routes(router)
    _token_routes(router)
    _audit_routes(router)
    return router


def _user_routes(router: APIRouter) -> None:
    @router.get("/roles", tags=["users"])
    async def list_roles(_: Admin) -> list[RoleInfo]:
        return [RoleInfo(name=role, permissions=sorted(ROLE_PERMISSIONS[role])) for role in Role]

    @router.get("/users", tags=["users"])
    async def list_users(
        _: Admin,
        context: Context,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[UserPublic]:
        return await UserStore(context.pool).list_users(limit, offset)

    @router.post("/users", status_code=201, tags=["users"])
    async def create_user(
        user: UserCreate, principal: Admin, context: Context, audit: Audit, request: Request
    ) -> UserPublic:
        try:
            created = await UserStore(context.pool).create(user)
        except UserExistsError as exc:
            raise HTTPException(status_code=409, detail=f"user {user.username} exists") from exc
        await _audit_change(
            audit,
            principal,
            request,
            action=AuditAction.CREATE,
            objects=[AuditObject(type="user", id=created.username)],
            details={"roles": [r.value for r in created.roles], "disabled": created.disabled},
        )
        return created

    @router.get("/users/{username}", tags=["users"])
    async def get_user(username: Username, _: Admin, context: Context) -> UserPublic:
        user = await UserStore(context.pool).get(username)
        if user is None:
            raise HTTPException(status_code=404, detail=f"no user {username}")
        return user

    @router.patch("/users/{username}", tags=["users"])
    async def update_user(
        username: Username,
        change: UserUpdate,
        *,
        principal: Admin,
        context: Context,
        audit: Audit,
        request: Request,
    ) -> UserPublic:
        user = await UserStore(context.pool).update(username, change)
        if user is None:
            raise HTTPException(status_code=404, detail=f"no user {username}")
        await _audit_change(
            audit,
            principal,
            request,
            action=AuditAction.UPDATE,
            objects=[AuditObject(type="user", id=username)],
            details={"changed": change.model_dump(mode="json", exclude_unset=True)},
        )
        return user

    @router.delete("/users/{username}", status_code=204, tags=["users"])
    async def delete_user(
        username: Username, principal: Admin, context: Context, audit: Audit, request: Request
    ) -> Response:
        if not await UserStore(context.pool).delete(username):
            raise HTTPException(status_code=404, detail=f"no user {username}")
        await _audit_change(
            audit,
            principal,
            request,
            action=AuditAction.DELETE,
            objects=[AuditObject(type="user", id=username)],
            details={},
        )
        return Response(status_code=204)


def _token_routes(router: APIRouter) -> None:
    @router.post("/tokens", status_code=201, tags=["tokens"])
    async def create_token(
        body: TokenCreate, principal: Admin, context: Context, audit: Audit, request: Request
    ) -> TokenCreated:
        if body.expires_at is not None:
            if body.expires_at.tzinfo is None:
                raise HTTPException(status_code=422, detail="expires_at needs a time zone")
            if body.expires_at <= datetime.now(UTC):
                raise HTTPException(status_code=422, detail="expires_at is in the past")
        roles = None if body.roles is None else frozenset(body.roles)
        try:
            record, secret = await TokenStore(context.pool).create(
                body.username, body.name, roles, body.expires_at
            )
        except UnknownUserError as exc:
            raise HTTPException(status_code=404, detail=f"no user {body.username}") from exc
        except RolesNotHeldError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        await _audit_change(
            audit,
            principal,
            request,
            action=AuditAction.CREATE,
            objects=[
                AuditObject(type="user", id=record.username),
                AuditObject(type="token", id=str(record.id)),
            ],
            details={"name": record.name, "roles": [r.value for r in record.roles]},
        )
        return TokenCreated(**record.model_dump(), secret=secret)

    @router.get("/tokens", tags=["tokens"])
    async def list_tokens(
        _: Admin,
        context: Context,
        username: Annotated[str | None, Query(pattern=USERNAME_PATTERN)] = None,
        include_revoked: bool = False,
    ) -> list[TokenRecord]:
        return await TokenStore(context.pool).list_tokens(username, include_revoked)

    @router.delete("/tokens/{token_id}", tags=["tokens"])
    async def revoke_token(
        token_id: int, principal: Admin, context: Context, audit: Audit, request: Request
    ) -> TokenRecord:
        """Revoke a token (it stays listed with ``include_revoked``)."""
        record = await TokenStore(context.pool).revoke(token_id)
        if record is None:
            raise HTTPException(status_code=404, detail=f"no token {token_id}")
        await _audit_change(
            audit,
            principal,
            request,
            action=AuditAction.DELETE,
            objects=[
                AuditObject(type="user", id=record.username),
                AuditObject(type="token", id=str(token_id)),
            ],
            details={"name": record.name},
        )
        return record


def _audit_routes(router: APIRouter) -> None:
    async def read_audit(
        principal: Principal, query: AuditQuery, audit: AuditLog, request: Request
    ) -> list[AuditEvent]:
        if query.since and query.until and query.since >= query.until:
            raise HTTPException(status_code=422, detail="since must be before until")
        events = await audit.query(query)
        await audit.record(
            AuditEventId.AUDIT_LOG_USED,
            AuditAction.READ,
            AuditOutcome.SUCCESS,
            actor=http_actor(principal, request),
            details={"query": query.model_dump(mode="json", exclude_defaults=True), "events": len(events)},
        )
        return events

    @router.get("/audit", tags=["audit"])
    async def query_audit(
        query: Annotated[AuditQuery, Query()], principal: Admin, audit: Audit, request: Request
    ) -> list[AuditEvent]:
        """Audit events, newest first, by time range (``since`` ≤ time < ``until``),
        actor, study, patient or event id."""
        return await read_audit(principal, query, audit, request)

    @router.get(
        "/audit/fhir",
        tags=["audit"],
        response_class=JSONResponse,
        responses={200: {"content": {FHIR_JSON: {}}, "description": "A FHIR Bundle of AuditEvent resources"}},
    )
    async def query_audit_fhir(
        query: Annotated[AuditQuery, Query()], principal: Admin, audit: Audit, request: Request
    ) -> JSONResponse:
        """The same events as FHIR R4 AuditEvent resources in a searchset Bundle."""
        events = await read_audit(principal, query, audit, request)
        return JSONResponse(fhir_bundle(events, audit.source_id, audit.site_id), media_type=FHIR_JSON)
