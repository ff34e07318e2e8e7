"""``DELETE /studies/{uid}``, ``/series/{uid}``, ``/instances/{uid}``: the
management API's deletes.

The same deletion as DICOMweb DELETE (``dicomweb_api.delete``: one index
transaction, then the objects, audited); here an entity is named by its own
UID and the parents are looked up in the index, and the answer says what
went.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path

from dicomweb_api.api.models import DeletionResult
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.delete import Level, StudyLockedError, delete_from_index, delete_objects, record_deletion
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import AuditScope, StudyDeleted

__all__ = ["create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
Deleter = Annotated[Principal, Depends(require(Permission.DELETE))]
Uid = Annotated[str, Path(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]

_PARENTS: Final = {
    Level.STUDY: "SELECT study_instance_uid AS study, NULL AS series FROM study WHERE study_instance_uid = $1",
    Level.SERIES: """
        SELECT s.study_instance_uid AS study, se.series_instance_uid AS series
        FROM series se JOIN study s ON s.pk = se.study_fk WHERE se.series_instance_uid = $1
    """,
    Level.INSTANCE: """
        SELECT s.study_instance_uid AS study, se.series_instance_uid AS series
        FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study s ON s.pk = se.study_fk
        WHERE i.sop_instance_uid = $1
    """,
}
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "not in the archive"}}


async def _delete(
    context: ApiContext, principal: Principal, audit: AuditScope, level: Level, uid: str
) -> DeletionResult:
    parents = await context.pool.fetchrow(_PARENTS[level], uid)
    if parents is None:
        raise HTTPException(status_code=404, detail=f"no {level.value} {uid}")
    study: str = parents["study"]
    series: str | None = parents["series"]
    await audit.add_study(study)
    sop = uid if level is Level.INSTANCE else None
    try:
        deleted = await delete_from_index(context.pool, level, study, series, sop, holder=principal.subject)
    except StudyLockedError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    if deleted is None:  # deleted meanwhile
        raise HTTPException(status_code=404, detail=f"no {level.value} {uid}")
    uids = {"study_instance_uid": study}
    if series is not None:
        uids["series_instance_uid"] = series
    if sop is not None:
        uids["sop_instance_uid"] = sop
    record_deletion(audit, principal, level, uids, deleted)
    failures = await asyncio.to_thread(delete_objects, context.storage, deleted.objects)
    return DeletionResult(
        level=level.value,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        instances_deleted=len(deleted.sop_instance_uids),
        objects_deleted=len(deleted.objects) - failures,
        objects_not_deleted=failures,
    )


def create_router() -> APIRouter:
    router = APIRouter(tags=["archive"])

    @router.delete(
        "/studies/{study_instance_uid}",
        response_model=DeletionResult,
        summary="Delete a study (index rows and objects)",
        responses=_NOT_FOUND,
    )
    async def delete_study(
        context: Context, principal: Deleter, audit: StudyDeleted, study_instance_uid: Uid
    ) -> DeletionResult:
        return await _delete(context, principal, audit, Level.STUDY, study_instance_uid)

    @router.delete(
        "/series/{series_instance_uid}",
        response_model=DeletionResult,
        summary="Delete a series (index rows and objects)",
        responses=_NOT_FOUND,
    )
    async def delete_series(
        context: Context, principal: Deleter, audit: StudyDeleted, series_instance_uid: Uid
    ) -> DeletionResult:
        return await _delete(context, principal, audit, Level.SERIES, series_instance_uid)

    @router.delete(
        "/instances/{sop_instance_uid}",
        response_model=DeletionResult,
        summary="Delete an instance (index row and object)",
        responses=_NOT_FOUND,
    )
    async def delete_instance(
        context: Context, principal: Deleter, audit: StudyDeleted, sop_instance_uid: Uid
    ) -> DeletionResult:
        return await _delete(context, principal, audit, Level.INSTANCE, sop_instance_uid)

    return router
