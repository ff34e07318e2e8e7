"""``/jobs``: long-running work (C-MOVE, prefetch, migration, AI, export)
with its progress; list, cancel, retry (``pacs_common.jobs``).

Workers create and run the jobs; here administrators watch them, cancel a
queued or running one (its worker stops at its next progress report) and
put a failed or cancelled one back in the queue.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from dicomweb_api.api.models import Page
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.jobs import Job, JobKind, JobNotFoundError, JobRepository, JobState, JobStateError

__all__ = ["create_router"]

TOTAL_COUNT_HEADER: Final = "X-Total-Count"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000

Context = Annotated[ApiContext, Depends(get_context)]
JobId = Annotated[int, Path(ge=1)]
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no such job"}}
_TRANSITION: Final[dict[int | str, dict[str, Any]]] = {
    **_NOT_FOUND,
    409: {"description": "the job's state does not allow it"},
}


async def _transition(context: ApiContext, job_id: int, *, cancel: bool) -> Job:
    jobs = JobRepository(context.pool)
    try:
        return await (jobs.cancel(job_id) if cancel else jobs.retry(job_id))
    except JobNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except JobStateError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc


def create_router() -> APIRouter:
    router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require(Permission.ADMIN))])

    @router.get("", response_model=Page[Job], summary="List jobs, newest first")
    async def list_jobs(
        *,
        context: Context,
        response: Response,
        kind: Annotated[list[JobKind] | None, Query(description="only these kinds (repeatable)")] = None,
        state: Annotated[list[JobState] | None, Query(description="only these states (repeatable)")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Page[Job]:
        total, items = await JobRepository(context.pool).list(
            kinds=None if kind is None else frozenset(kind),
            states=None if state is None else frozenset(state),
            limit=limit,
            offset=offset,
        )
        response.headers[TOTAL_COUNT_HEADER] = str(total)
        return Page[Job](total=total, limit=limit, offset=offset, items=items)

    @router.get("/{job_id}", response_model=Job, summary="One job", responses=_NOT_FOUND)
    async def get_job(context: Context, job_id: JobId) -> Job:
        job = await JobRepository(context.pool).get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return job

    @router.post(
        "/{job_id}/cancel",
        response_model=Job,
        summary="Cancel a queued or running job",
        responses=_TRANSITION,
    )
    async def cancel_job(context: Context, job_id: JobId) -> Job:
        return await _transition(context, job_id, cancel=True)

    @router.post(
        "/{job_id}/retry",
        response_model=Job,
        summary="Queue a failed or cancelled job again",
        responses=_TRANSITION,
    )
    async def retry_job(context: Context, job_id: JobId) -> Job:
        return await _transition(context, job_id, cancel=False)

    return router
