"""``/studies/{uid}/lock``: study locks (exclusive or shared, with an expiry).

Delete refuses a study another holder has locked, and the hsm-migrator
leaves it alone (``pacs_common.locks``).  The holder is the caller's
subject; a lock is released by its holder, or by an administrator.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, permissions_of, require
from pacs_common import locks
from pacs_common.locks import LockConflictError, LockMode, StudyLock

__all__ = ["LockRequest", "create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
Locker = Annotated[Principal, Depends(require(Permission.WORKFLOW))]
Uid = Annotated[str, Path(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]

#: A lock lasts at most a day; a holder that needs longer takes it again.
MAX_TTL_SECONDS: Final = 86_400


class LockRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: LockMode = LockMode.EXCLUSIVE
    ttl_seconds: int = Field(default=900, gt=0, le=MAX_TTL_SECONDS)
    reason: str | None = Field(default=None, max_length=1024)


class LockConflict(BaseModel):
    model_config = ConfigDict(frozen=True)

    detail: str
    conflicting: list[StudyLock]


_CONFLICT: Final[dict[int | str, dict[str, Any]]] = {
    409: {"model": LockConflict, "description": "a live lock of somebody else is incompatible"}
}


def create_router() -> APIRouter:
    router = APIRouter(prefix="/studies/{study_instance_uid}", tags=["locks"])

    @router.post(
        "/lock",
        response_model=StudyLock,
        status_code=201,
        summary="Lock the study (exclusive or shared) until the lock expires or is released",
        responses=_CONFLICT,
    )
    async def lock_study(
        context: Context, principal: Locker, study_instance_uid: Uid, request: LockRequest
    ) -> StudyLock | JSONResponse:
        async with context.pool.acquire() as connection:
            try:
                return await locks.acquire(
                    connection,
                    study_instance_uid,
                    principal.subject,
                    mode=request.mode,
                    ttl_seconds=request.ttl_seconds,
                    reason=request.reason,
                )
            except LockConflictError as exc:
                body = LockConflict(detail=str(exc), conflicting=exc.conflicting)
                return JSONResponse(status_code=409, content=body.model_dump(mode="json"))

    @router.get("/locks", response_model=list[StudyLock], summary="The study's live locks")
    async def list_locks(context: Context, principal: Locker, study_instance_uid: Uid) -> list[StudyLock]:
        async with context.pool.acquire() as connection:
            return await locks.list_live(connection, study_instance_uid)

    @router.delete(
        "/lock/{lock_id}",
        status_code=204,
        summary="Release a lock (its holder, or an administrator)",
        responses={
            403: {"description": "the lock is somebody else's"},
            404: {"description": "no such live lock on this study"},
        },
    )
    async def unlock_study(
        context: Context, principal: Locker, study_instance_uid: Uid, lock_id: uuid.UUID
    ) -> Response:
        async with context.pool.acquire() as connection:
            lock = await locks.get(connection, study_instance_uid, lock_id)
            if lock is None:
                raise HTTPException(
                    status_code=404, detail=f"no live lock {lock_id} on study {study_instance_uid}"
                )
            admin = Permission.ADMIN in permissions_of(principal.roles)
            if lock.holder != principal.subject and not admin:
                raise HTTPException(status_code=403, detail=f"the lock is held by {lock.holder}")
            if not await locks.release(
                connection, study_instance_uid, lock_id, None if admin else principal.subject
            ):
                raise HTTPException(
                    status_code=404, detail=f"no live lock {lock_id} on study {study_instance_uid}"
                )
        return Response(status_code=204)

    return router
