"""``/prefetch``: fetch a patient's prior studies from a remote PACS now,
rather than when a worklist item calls for it.

``POST /prefetch`` queues a ``prefetch`` job (``pacs_common.jobs``) that the
prefetch-scheduler runs: it queries the remote PACS (the given source, or
every configured one), chooses the priors by its rules (lookback, same
modality first, at most N) and has them sent to the gateway.  The job's
``params.studies`` then says what became of each prior.  Technologists
(workflow permission) and administrators may ask; the job is also under
``/jobs/{id}`` for administrators.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from pacs_common.jobs import Job, JobKind, JobRepository
from pacs_common.nodes import RemoteNodeRepository

__all__ = ["PrefetchCreate", "create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
Requester = Annotated[Principal, Depends(require(Permission.WORKFLOW))]
JobId = Annotated[int, Path(ge=1)]
#: What the job's ``params.trigger`` says for requests made here.
ON_DEMAND: Final = "on-demand"
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no such prefetch job"}}


class PrefetchCreate(BaseModel):
    """A prefetch to run now."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=64, description="Patient ID at the remote PACS")
    source: str | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="AE title of a registered node to query (default: every configured source)",
    )
    modality: str | None = Field(
        default=None, min_length=1, max_length=16, description="prefer priors of this modality"
    )

    @field_validator("patient_id", "source", "modality")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        return value


def create_router() -> APIRouter:
    router = APIRouter(prefix="/prefetch", tags=["prefetch"])

    @router.post(
        "",
        response_model=Job,
        status_code=202,
        summary="Queue a prefetch of a patient's prior studies",
        responses={422: {"description": "the source is not a registered node"}},
    )
    async def create_prefetch(context: Context, principal: Requester, body: PrefetchCreate) -> Job:
        if body.source is not None and await RemoteNodeRepository(context.pool).get(body.source) is None:
            raise HTTPException(status_code=422, detail=f"{body.source} is not a registered node")
        params: dict[str, Any] = {"patient_id": body.patient_id, "trigger": ON_DEMAND}
        if body.source is not None:
            params["source"] = body.source
        if body.modality is not None:
            params["modality"] = body.modality.upper()
        return await JobRepository(context.pool).create(
            JobKind.PREFETCH, params, created_by=principal.subject
        )

    @router.get("/{job_id}", response_model=Job, summary="One prefetch job", responses=_NOT_FOUND)
    async def get_prefetch(context: Context, principal: Requester, job_id: JobId) -> Job:
        job = await JobRepository(context.pool).get(job_id)
        if job is None or job.kind is not JobKind.PREFETCH:
            raise HTTPException(status_code=404, detail=f"no prefetch job {job_id}")
        return job

    return router
