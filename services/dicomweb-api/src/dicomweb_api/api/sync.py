"""``/sync-relations``: PACS-to-PACS sync relations (``pacs_common.sync``),
run by the prefetch-scheduler; the remote must be a registered node.  A run
is asked for with ``POST /sync-relations/{name}/run``; ``/runs`` is the
history with counts, ``/conflicts`` the conflicts the runs found."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.nodes import RemoteNodeRepository
from pacs_common.sync import (
    RelationExistsError,
    RelationNotFoundError,
    SyncConflict,
    SyncRelation,
    SyncRelationCreate,
    SyncRepository,
    SyncRun,
)

__all__ = ["create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
Name = Annotated[str, Path(min_length=1, max_length=64)]
Limit = Annotated[int, Query(ge=1, le=500)]
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no such relation"}}


def create_router() -> APIRouter:
    router = APIRouter(
        prefix="/sync-relations", tags=["sync"], dependencies=[Depends(require(Permission.ADMIN))]
    )

    @router.get("", response_model=list[SyncRelation], summary="List sync relations")
    async def list_relations(context: Context) -> list[SyncRelation]:
        return await SyncRepository(context.pool).list()

    @router.post(
        "",
        response_model=SyncRelation,
        status_code=201,
        summary="Add a sync relation",
        responses={
            409: {"description": "a relation with this name exists"},
            422: {"description": "the remote is not a registered node"},
        },
    )
    async def add_relation(context: Context, relation: SyncRelationCreate) -> SyncRelation:
        if await RemoteNodeRepository(context.pool).get(relation.remote_ae_title) is None:
            raise HTTPException(
                status_code=422, detail=f"{relation.remote_ae_title} is not a registered node"
            )
        try:
            return await SyncRepository(context.pool).add(relation)
        except RelationExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    @router.get("/{name}", response_model=SyncRelation, summary="One relation", responses=_NOT_FOUND)
    async def get_relation(context: Context, name: Name) -> SyncRelation:
        relation = await SyncRepository(context.pool).get(name)
        if relation is None:
            raise HTTPException(status_code=404, detail=f"no sync relation {name}")
        return relation

    @router.delete("/{name}", status_code=204, summary="Remove a relation", responses=_NOT_FOUND)
    async def remove_relation(context: Context, name: Name) -> Response:
        if not await SyncRepository(context.pool).remove(name):
            raise HTTPException(status_code=404, detail=f"no sync relation {name}")
        return Response(status_code=204)

    @router.post(
        "/{name}/run",
        response_model=SyncRelation,
        status_code=202,
        summary="Run a relation as soon as a prefetch-scheduler replica is free",
        responses=_NOT_FOUND,
    )
    async def run_relation(context: Context, name: Name) -> SyncRelation:
        try:
            return await SyncRepository(context.pool).request_run(name)
        except RelationNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    @router.get(
        "/{name}/runs", response_model=list[SyncRun], summary="The runs, newest first", responses=_NOT_FOUND
    )
    async def list_runs(context: Context, name: Name, limit: Limit = 20) -> list[SyncRun]:
        repository = SyncRepository(context.pool)
        if await repository.get(name) is None:
            raise HTTPException(status_code=404, detail=f"no sync relation {name}")
        return await repository.history(name, limit=limit)

    @router.get(
        "/{name}/conflicts",
        response_model=list[SyncConflict],
        summary="Conflicts found (same SOP Instance UID, different content), newest first",
        responses=_NOT_FOUND,
    )
    async def list_conflicts(context: Context, name: Name, limit: Limit = 100) -> list[SyncConflict]:
        repository = SyncRepository(context.pool)
        if await repository.get(name) is None:
            raise HTTPException(status_code=404, detail=f"no sync relation {name}")
        return await repository.conflicts(name, limit=limit)

    return router
