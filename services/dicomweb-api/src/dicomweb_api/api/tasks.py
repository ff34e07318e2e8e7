"""``/tasks``: the scheduled maintenance tasks of the prefetch-scheduler
(retention cleanup, integrity verification, orphan cleanup): list, change
the schedule / parameters / pause switch, pause, resume, trigger a run now,
and each task's run history (``pacs_common.tasks``)."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.tasks import ScheduledTask, TaskNotFoundError, TaskRepository, TaskRun, TaskUpdate

__all__ = ["create_router"]

DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 1000

Context = Annotated[ApiContext, Depends(get_context)]
TaskName = Annotated[str, Path(min_length=1, max_length=64)]
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no such task"}}
_INVALID: Final[dict[int | str, dict[str, Any]]] = {
    **_NOT_FOUND,
    422: {"description": "an invalid schedule or invalid parameters for the task's kind"},
}


async def _do(context: ApiContext, name: str, action: str) -> ScheduledTask:
    tasks = TaskRepository(context.pool)
    try:
        if action == "pause":
            return await tasks.pause(name)
        if action == "resume":
            return await tasks.resume(name)
        return await tasks.trigger(name)
    except TaskNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc


def create_router() -> APIRouter:
    router = APIRouter(prefix="/tasks", tags=["tasks"], dependencies=[Depends(require(Permission.ADMIN))])

    @router.get("", response_model=list[ScheduledTask], summary="List the scheduled tasks")
    async def list_tasks(context: Context) -> list[ScheduledTask]:
        return await TaskRepository(context.pool).list()

    @router.get("/{name}", response_model=ScheduledTask, summary="One task", responses=_NOT_FOUND)
    async def get_task(context: Context, name: TaskName) -> ScheduledTask:
        task = await TaskRepository(context.pool).get(name)
        if task is None:
            raise HTTPException(status_code=404, detail=f"no task named {name!r}")
        return task

    @router.patch(
        "/{name}",
        response_model=ScheduledTask,
        summary="Change a task's schedule (cron or interval_seconds), params (replaced) or paused",
        responses=_INVALID,
    )
    async def update_task(context: Context, name: TaskName, change: TaskUpdate) -> ScheduledTask:
        try:
            return await TaskRepository(context.pool).update(name, change)
        except TaskNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc

    @router.post("/{name}/pause", response_model=ScheduledTask, summary="Pause a task", responses=_NOT_FOUND)
    async def pause_task(context: Context, name: TaskName) -> ScheduledTask:
        return await _do(context, name, "pause")

    @router.post(
        "/{name}/resume",
        response_model=ScheduledTask,
        summary="Resume a paused task (next run computed from now)",
        responses=_NOT_FOUND,
    )
    async def resume_task(context: Context, name: TaskName) -> ScheduledTask:
        return await _do(context, name, "resume")

    @router.post(
        "/{name}/trigger",
        response_model=ScheduledTask,
        status_code=202,
        summary="Run a task now (also a paused one); the next scheduler to look runs it",
        responses=_NOT_FOUND,
    )
    async def trigger_task(context: Context, name: TaskName) -> ScheduledTask:
        return await _do(context, name, "trigger")

    @router.get(
        "/{name}/runs",
        response_model=list[TaskRun],
        summary="A task's runs, newest first",
        responses=_NOT_FOUND,
    )
    async def list_runs(
        *,
        context: Context,
        name: TaskName,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[TaskRun]:
        try:
            return await TaskRepository(context.pool).runs(name, limit=limit, offset=offset)
        except TaskNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    return router
