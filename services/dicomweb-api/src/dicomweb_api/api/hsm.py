"""``/hsm``: storage tier migration for administrators.

``POST /hsm/runs`` queues a migration job (an hsm-migrator replica claims
and runs it; follow it under ``/jobs/{id}``); ``GET /hsm/runs`` lists the
migration passes (policy and job) with what they moved; ``GET /hsm/tiers``
says how many instances and bytes the index keeps in each tier.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from pacs_common.hsm.jobs import MigrationJobParams, MigrationRun, create_migration_job, recent_runs
from pacs_common.hsm.tiers import TierStatistics, tier_statistics
from pacs_common.jobs import Job

__all__ = ["HsmRunCreate", "create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]
_INVALID: Final[dict[int | str, dict[str, Any]]] = {
    422: {"description": "unknown tier, or invalid parameters"}
}


class HsmRunCreate(BaseModel):
    """An on-demand migration.  Without ``to_tier``: the configured policy
    rules now (those leaving ``from_tier`` when given).  With ``to_tier``:
    every matching instance goes there, whatever its age."""

    model_config = ConfigDict(extra="forbid")

    from_tier: str | None = Field(default=None, min_length=1, description="only instances now in this tier")
    to_tier: str | None = Field(default=None, min_length=1, description="move to this tier")
    study_instance_uids: list[str] | None = Field(
        default=None, min_length=1, description="only these studies"
    )
    dry_run: bool = Field(default=False, description="count what would move; move nothing")


def create_router() -> APIRouter:
    router = APIRouter(prefix="/hsm", tags=["hsm"], dependencies=[Depends(require(Permission.ADMIN))])

    @router.post(
        "/runs",
        response_model=Job,
        status_code=202,
        summary="Queue a migration job",
        responses=_INVALID,
    )
    async def create_run(context: Context, principal: Admin, body: HsmRunCreate) -> Job:
        try:
            params = MigrationJobParams.model_validate(body.model_dump())
            params.check_tiers(context.storage.names)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return await create_migration_job(context.pool, params, created_by=principal.subject)

    @router.get("/runs", response_model=list[MigrationRun], summary="Migration passes, newest first")
    async def list_runs(
        context: Context,
        job_id: Annotated[int | None, Query(ge=1, description="only the passes of this job")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[MigrationRun]:
        return await recent_runs(context.pool, job_id=job_id, limit=limit)

    @router.get("/tiers", response_model=list[TierStatistics], summary="Instances and bytes per storage tier")
    async def tiers(context: Context) -> list[TierStatistics]:
        return await tier_statistics(context.pool, context.storage.names)

    return router
