"""``/studies/{uid}/annotations``, ``/measurements`` and ``/viewer-state``:
clinical data a viewer keeps beside the images.

Annotations and measurements are JSON documents (the viewer's own format,
e.g. OHIF's measurement JSON) with an author and the series, instance and
frame they are drawn on; references are checked against the index.  They
are changed or removed by their author, or an administrator.  The viewer
state is one JSON document per user (the principal's subject) and study.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, permissions_of, require

__all__ = ["Annotation", "AnnotationWrite", "ViewerState", "ViewerStateWrite", "create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
Clinician = Annotated[Principal, Depends(require(Permission.CLINICAL))]
_UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"
Uid = Annotated[str, Path(pattern=_UID_PATTERN, max_length=64)]
Kind = Literal["annotation", "measurement"]


class AnnotationWrite(BaseModel):
    """An annotation or measurement to create, or its new content (PUT replaces it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    series_instance_uid: str | None = Field(default=None, pattern=_UID_PATTERN, max_length=64)
    sop_instance_uid: str | None = Field(default=None, pattern=_UID_PATTERN, max_length=64)
    frame_number: int | None = Field(default=None, ge=1)
    # The document itself (geometry, label, value and unit…), as the viewer writes it.
    data: dict[str, Any]

    @model_validator(mode="after")
    def _frame_needs_instance(self) -> AnnotationWrite:
        if self.frame_number is not None and self.sop_instance_uid is None:
            raise ValueError("a frame number needs the SOP Instance UID of its instance")
        return self


class Annotation(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    kind: Kind
    study_instance_uid: str
    series_instance_uid: str | None
    sop_instance_uid: str | None
    frame_number: int | None
    author: str
    data: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class ViewerStateWrite(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    state: dict[str, Any]


class ViewerState(BaseModel):
    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    subject: str
    state: dict[str, Any]
    updated_at: datetime


_COLUMNS: Final = (
    "id, kind, study_instance_uid, series_instance_uid, sop_instance_uid, frame_number, "
    "author, data, created_at, updated_at"
)
_STUDY_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {
    404: {"description": "no such study in the archive"}
}
_ITEM_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    403: {"description": "somebody else's (only its author or an administrator may change it)"},
    404: {"description": "no such study or item"},
}


async def _check_study(pool: asyncpg.Pool, study: str) -> None:
    if await pool.fetchval("SELECT 1 FROM study WHERE study_instance_uid = $1", study) is None:
        raise HTTPException(status_code=404, detail=f"no study {study}")


async def _check_references(pool: asyncpg.Pool, study: str, write: AnnotationWrite) -> AnnotationWrite:
    """The study holds what ``write`` refers to; the series is filled in from the instance."""
    await _check_study(pool, study)
    if write.sop_instance_uid is not None:
        row = await pool.fetchrow(
            """
            SELECT se.series_instance_uid, i.number_of_frames
            FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study s ON s.pk = se.study_fk
            WHERE s.study_instance_uid = $1 AND i.sop_instance_uid = $2
            """,
            study,
            write.sop_instance_uid,
        )
        if row is None:
            raise HTTPException(
                status_code=422, detail=f"no instance {write.sop_instance_uid} in study {study}"
            )
        if write.series_instance_uid not in (None, row["series_instance_uid"]):
            raise HTTPException(
                status_code=422,
                detail=f"instance {write.sop_instance_uid} is in series {row['series_instance_uid']}",
            )
        frames = row["number_of_frames"] or 1
        if write.frame_number is not None and write.frame_number > frames:
            raise HTTPException(status_code=422, detail=f"the instance has {frames} frame(s)")
        return write.model_copy(update={"series_instance_uid": row["series_instance_uid"]})
    if write.series_instance_uid is not None:
        found = await pool.fetchval(
            """
            SELECT 1 FROM series se JOIN study s ON s.pk = se.study_fk
            WHERE s.study_instance_uid = $1 AND se.series_instance_uid = $2
            """,
            study,
            write.series_instance_uid,
        )
        if found is None:
            raise HTTPException(
                status_code=422, detail=f"no series {write.series_instance_uid} in study {study}"
            )
    return write


def _annotation(row: asyncpg.Record) -> Annotation:
    return Annotation.model_validate(dict(row))


async def _owned(
    context: ApiContext, principal: Principal, kind: Kind, study: str, item_id: uuid.UUID
) -> None:
    """404 when there is no such item, 403 when the caller may not change it."""
    author = await context.pool.fetchval(
        "SELECT author FROM clinical_annotation WHERE id = $1 AND kind = $2 AND study_instance_uid = $3",
        item_id,
        kind,
        study,
    )
    if author is None:
        raise HTTPException(status_code=404, detail=f"no {kind} {item_id} in study {study}")
    if author != principal.subject and Permission.ADMIN not in permissions_of(principal.roles):
        raise HTTPException(status_code=403, detail=f"the {kind} is {author}'s")


def _add_item_routes(router: APIRouter, kind: Kind, collection: str) -> None:
    """CRUD of one kind of item under ``/studies/{uid}/{collection}``."""
    base = f"/studies/{{study_instance_uid}}/{collection}"

    async def list_items(context: Context, principal: Clinician, study_instance_uid: Uid) -> list[Annotation]:
        await _check_study(context.pool, study_instance_uid)
        rows = await context.pool.fetch(
            f"""
            SELECT {_COLUMNS} FROM clinical_annotation
            WHERE study_instance_uid = $1 AND kind = $2 ORDER BY created_at, id
            """,
            study_instance_uid,
            kind,
        )
        return [_annotation(row) for row in rows]

    async def create_item(
        context: Context, principal: Clinician, study_instance_uid: Uid, item: AnnotationWrite
    ) -> Annotation:
        item = await _check_references(context.pool, study_instance_uid, item)
        row = await context.pool.fetchrow(
            f"""
            INSERT INTO clinical_annotation
                (kind, study_instance_uid, series_instance_uid, sop_instance_uid, frame_number, author, data)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING {_COLUMNS}
            """,
            kind,
            study_instance_uid,
            item.series_instance_uid,
            item.sop_instance_uid,
            item.frame_number,
            principal.subject,
            item.data,
        )
        assert row is not None
        return _annotation(row)

    async def get_item(
        context: Context, principal: Clinician, study_instance_uid: Uid, item_id: uuid.UUID
    ) -> Annotation:
        row = await context.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM clinical_annotation WHERE id = $1 AND kind = $2 AND study_instance_uid = $3",
            item_id,
            kind,
            study_instance_uid,
        )
        if row is None:
            raise HTTPException(status_code=404, detail=f"no {kind} {item_id} in study {study_instance_uid}")
        return _annotation(row)

    async def replace_item(
        context: Context,
        principal: Clinician,
        study_instance_uid: Uid,
        item_id: uuid.UUID,
        item: AnnotationWrite,
    ) -> Annotation:
        await _owned(context, principal, kind, study_instance_uid, item_id)
        item = await _check_references(context.pool, study_instance_uid, item)
        row = await context.pool.fetchrow(
            f"""
            UPDATE clinical_annotation
            SET series_instance_uid = $4, sop_instance_uid = $5, frame_number = $6, data = $7, updated_at = now()
            WHERE id = $1 AND kind = $2 AND study_instance_uid = $3
            RETURNING {_COLUMNS}
            """,
            item_id,
            kind,
            study_instance_uid,
            item.series_instance_uid,
            item.sop_instance_uid,
            item.frame_number,
            item.data,
        )
        if row is None:  # removed meanwhile
            raise HTTPException(status_code=404, detail=f"no {kind} {item_id} in study {study_instance_uid}")
        return _annotation(row)

    async def delete_item(
        context: Context, principal: Clinician, study_instance_uid: Uid, item_id: uuid.UUID
    ) -> Response:
        await _owned(context, principal, kind, study_instance_uid, item_id)
        await context.pool.execute("DELETE FROM clinical_annotation WHERE id = $1", item_id)
        return Response(status_code=204)

    router.add_api_route(
        base,
        list_items,
        methods=["GET"],
        response_model=list[Annotation],
        summary=f"The study's {collection}, oldest first",
        responses=_STUDY_NOT_FOUND,
        tags=["clinical"],
        operation_id=f"list_{collection}",
    )
    router.add_api_route(
        base,
        create_item,
        methods=["POST"],
        response_model=Annotation,
        status_code=201,
        summary=f"Add a {kind} (the caller is its author)",
        responses={**_STUDY_NOT_FOUND, 422: {"description": "refers to what the study does not hold"}},
        tags=["clinical"],
        operation_id=f"create_{kind}",
    )
    router.add_api_route(
        f"{base}/{{item_id}}",
        get_item,
        methods=["GET"],
        response_model=Annotation,
        summary=f"One {kind}",
        responses=_ITEM_ERRORS,
        tags=["clinical"],
        operation_id=f"get_{kind}",
    )
    router.add_api_route(
        f"{base}/{{item_id}}",
        replace_item,
        methods=["PUT"],
        response_model=Annotation,
        summary=f"Replace a {kind}'s references and document",
        responses=_ITEM_ERRORS,
        tags=["clinical"],
        operation_id=f"replace_{kind}",
    )
    router.add_api_route(
        f"{base}/{{item_id}}",
        delete_item,
        methods=["DELETE"],
        status_code=204,
        summary=f"Remove a {kind}",
        responses=_ITEM_ERRORS,
        tags=["clinical"],
        operation_id=f"delete_{kind}",
    )


def create_router() -> APIRouter:
    router = APIRouter()
    _add_item_routes(router, "annotation", "annotations")
    _add_item_routes(router, "measurement", "measurements")

    @router.get(
        "/studies/{study_instance_uid}/viewer-state",
        response_model=ViewerState,
        tags=["clinical"],
        summary="The caller's viewer state of the study",
        responses={404: {"description": "none saved"}},
    )
    async def get_viewer_state(
        context: Context, principal: Clinician, study_instance_uid: Uid
    ) -> ViewerState:
        row = await context.pool.fetchrow(
            """
            SELECT study_instance_uid, subject, state, updated_at FROM viewer_state
            WHERE subject = $1 AND study_instance_uid = $2
            """,
            principal.subject,
            study_instance_uid,
        )
        if row is None:
            raise HTTPException(
                status_code=404, detail=f"no viewer state saved for study {study_instance_uid}"
            )
        return ViewerState.model_validate(dict(row))

    @router.put(
        "/studies/{study_instance_uid}/viewer-state",
        response_model=ViewerState,
        tags=["clinical"],
        summary="Save the caller's viewer state of the study",
        responses=_STUDY_NOT_FOUND,
    )
    async def put_viewer_state(
        context: Context, principal: Clinician, study_instance_uid: Uid, write: ViewerStateWrite
    ) -> ViewerState:
        await _check_study(context.pool, study_instance_uid)
        row = await context.pool.fetchrow(
            """
            INSERT INTO viewer_state (subject, study_instance_uid, state) VALUES ($1, $2, $3)
            ON CONFLICT (subject, study_instance_uid) DO UPDATE SET state = excluded.state, updated_at = now()
            RETURNING study_instance_uid, subject, state, updated_at
            """,
            principal.subject,
            study_instance_uid,
            write.state,
        )
        assert row is not None
        return ViewerState.model_validate(dict(row))

    return router
