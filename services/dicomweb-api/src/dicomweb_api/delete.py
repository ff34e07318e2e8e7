"""DELETE of a study, a series or an instance (``/dicom-web/studies/...``).

The index and storage work is :mod:`pacs_common.deletion` (shared with the
REST API and the retention task): one index transaction, then the objects
are deleted from storage; an object that cannot be deleted then is logged
(the index no longer refers to it, the orphan cleanup finds it) and does
not fail the request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import AuditScope, StudyDeleted
from pacs_common.deletion import (
    DeletedObjects,
    Level,
    ObjectRef,
    StudyLockedError,
    delete_from_index,
    delete_objects,
)

__all__ = [
    "DeletedObjects",
    "Level",
    "ObjectRef",
    "StudyLockedError",
    "create_router",
    "delete_from_index",
    "delete_objects",
    "record_deletion",
]

logger = logging.getLogger(__name__)

_ContextDep = Annotated[ApiContext, Depends(get_context)]
_DeleterDep = Annotated[Principal, Depends(require(Permission.DELETE))]


def record_deletion(
    audit: AuditScope, principal: Principal, level: Level, uids: dict[str, str], deleted: DeletedObjects
) -> None:
    """The audit point of every DELETE: logged, and put in the request's audit
    event ("DICOM Study Deleted", written by the :data:`StudyDeleted`
    dependency once the request's outcome is known)."""
    audit.add("series", uids.get("series_instance_uid"))
    audit.add("instance", uids.get("sop_instance_uid"))
    audit.details.update(level=level.value, instances=len(deleted.sop_instance_uids), **uids)
    logger.info(
        "deleted %s",
        level.value,
        extra={
            "subject": principal.subject,
            "auth_method": principal.method,
            "level": level.value,
            **uids,
            "instances": len(deleted.sop_instance_uids),
        },
    )


async def _handle(
    context: ApiContext,
    principal: Principal,
    audit: AuditScope,
    level: Level,
    study: str,
    *,
    series: str | None = None,
    sop: str | None = None,
) -> Response:
    try:
        deleted = await delete_from_index(context.pool, level, study, series, sop, holder=principal.subject)
    except StudyLockedError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    if deleted is None:
        raise HTTPException(status_code=404, detail=f"{level.value} not found")
    uids = {"study_instance_uid": study}
    if series is not None:
        uids["series_instance_uid"] = series
    if sop is not None:
        uids["sop_instance_uid"] = sop
    record_deletion(audit, principal, level, uids, deleted)
    await asyncio.to_thread(delete_objects, context.storage, deleted.objects)
    return Response(status_code=204)


def create_router() -> APIRouter:
    router = APIRouter(tags=["DELETE"])

    @router.delete("/studies/{study}", status_code=204, summary="Delete a study")
    async def delete_study(
        study: str, context: _ContextDep, principal: _DeleterDep, audit: StudyDeleted
    ) -> Response:
        return await _handle(context, principal, audit, Level.STUDY, study)

    @router.delete("/studies/{study}/series/{series}", status_code=204, summary="Delete a series")
    async def delete_series(
        study: str, series: str, context: _ContextDep, principal: _DeleterDep, audit: StudyDeleted
    ) -> Response:
        return await _handle(context, principal, audit, Level.SERIES, study, series=series)

    @router.delete(
        "/studies/{study}/series/{series}/instances/{instance}", status_code=204, summary="Delete an instance"
    )
    async def delete_instance(
        *,
        study: str,
        series: str,
        instance: str,
        context: _ContextDep,
        principal: _DeleterDep,
        audit: StudyDeleted,
    ) -> Response:
        return await _handle(context, principal, audit, Level.INSTANCE, study, series=series, sop=instance)

    return router
