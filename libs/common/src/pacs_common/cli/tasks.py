"""``pacs tasks list|show|pause|resume|trigger|history|set|hold|unhold``:
the scheduled maintenance tasks of the prefetch-scheduler (retention
cleanup, integrity verification, orphan cleanup) and the studies retention
never deletes.

Schedules are 5-field cron expressions in UTC or intervals in seconds.
``trigger`` asks for a run now (the next scheduler replica to look runs it,
also when the task is paused); with ``--wait`` the command waits for that
run to end and fails when the run did not succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pacs_common.cli.common import CliError, connect_database, database_settings
from pacs_common.localrun.infra import run_sync
from pacs_common.settings import DatabaseSettings
from pacs_common.tasks import (
    ScheduledTask,
    ScheduleError,
    TaskNotFoundError,
    TaskRepository,
    TaskRun,
    TaskUpdate,
)

T = TypeVar("T")

_WAIT_POLL_SECONDS = 0.5


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "tasks", help="scheduled maintenance tasks (retention, integrity, orphans) and retention holds"
    )
    commands = parser.add_subparsers(
        dest="tasks_command",
        metavar="{list,show,pause,resume,trigger,history,set,hold,unhold,holds}",
        required=True,
    )

    listing = commands.add_parser("list", help="list the tasks with their schedules")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=run_list)

    show = commands.add_parser("show", help="one task with its last run")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)

    pause = commands.add_parser("pause", help="stop running a task on its schedule")
    pause.add_argument("name", metavar="NAME")
    pause.set_defaults(handler=run_pause)

    resume = commands.add_parser("resume", help="run a paused task on its schedule again")
    resume.add_argument("name", metavar="NAME")
    resume.set_defaults(handler=run_resume)

    trigger = commands.add_parser("trigger", help="run a task now (also a paused one)")
    trigger.add_argument("name", metavar="NAME")
    trigger.add_argument(
        "--wait", action="store_true", help="wait for the run to end; fail unless it succeeded"
    )
    trigger.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS", help="with --wait")
    trigger.set_defaults(handler=run_trigger)

    history = commands.add_parser("history", help="a task's runs, newest first")
    history.add_argument("name", metavar="NAME")
    history.add_argument("--limit", type=_positive, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="machine-readable output (with summaries)")
    history.set_defaults(handler=run_history)

    change = commands.add_parser("set", help="change a task's schedule and/or parameters")
    change.add_argument("name", metavar="NAME")
    schedule = change.add_mutually_exclusive_group()
    schedule.add_argument("--cron", metavar="EXPR", help="5-field cron expression, UTC (e.g. '0 2 * * *')")
    schedule.add_argument("--interval", type=_positive, metavar="SECONDS", help="run every SECONDS")
    change.add_argument(
        "--params", type=_json_object, metavar="JSON", help="the task's parameters (replaced)"
    )
    change.set_defaults(handler=run_set)

    hold = commands.add_parser("hold", help="protect a study from retention")
    hold.add_argument("study_uid", metavar="STUDY_UID")
    hold.add_argument("--reason")
    hold.set_defaults(handler=run_hold)

    unhold = commands.add_parser("unhold", help="remove a study's retention hold")
    unhold.add_argument("study_uid", metavar="STUDY_UID")
    unhold.set_defaults(handler=run_unhold)

    holds = commands.add_parser("holds", help="list the studies on retention hold")
    holds.add_argument("--json", action="store_true", help="machine-readable output")
    holds.set_defaults(handler=run_holds)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("the parameters are a JSON object")
    return value


def _with_repository(settings: DatabaseSettings, work: Callable[[TaskRepository], Awaitable[T]]) -> T:
    async def call() -> T:
        connection = await connect_database(settings)
        try:
            return await work(TaskRepository(connection))
        except TaskNotFoundError as exc:
            raise CliError(str(exc)) from exc
        except ValueError as exc:  # a bad schedule or bad parameters
            raise CliError(str(exc)) from exc
        finally:
            await connection.close()

    return run_sync(call)


def _when(value: Any) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def _schedule(task: ScheduledTask) -> str:
    return f"cron {task.cron}" if task.cron else f"every {task.interval_seconds}s"


def _describe(task: ScheduledTask) -> str:
    lines = [
        f"name          {task.name}",
        f"kind          {task.kind}",
        f"schedule      {_schedule(task)}{'  (paused)' if task.paused else ''}",
        f"next run      {_when(task.next_run_at) if task.next_run_at else 'when a scheduler first sees it'}"
        + ("  (triggered: runs at once)" if task.trigger_requested else ""),
        f"params        {json.dumps(task.params, sort_keys=True)}",
        f"last run      {task.last_run_status or '-'}  started {_when(task.last_run_started_at)}  "
        f"finished {_when(task.last_run_finished_at)}",
        f"last success  {_when(task.last_success_at)}",
    ]
    if task.lease_owner:
        lines.append(f"running on    {task.lease_owner} (lease until {_when(task.lease_expires_at)})")
    return "\n".join(lines)


def _run_line(run: TaskRun) -> str:
    summary = ", ".join(
        f"{k}={v}"
        for k, v in run.summary.items()
        if isinstance(v, int | float | bool) and not isinstance(v, bool)
    )
    return (
        f"{run.id:>6}  {run.status:<11}  {run.trigger:<9}  {_when(run.started_at):<25}  "
        f"{_when(run.finished_at):<25}  {summary}{'  error: ' + run.error if run.error else ''}"
    )


def run_list(args: argparse.Namespace) -> int:
    tasks = _with_repository(database_settings(args.project_dir), lambda repo: repo.list())
    if args.json:
        print(json.dumps([t.model_dump(mode="json") for t in tasks], indent=2))
        return 0
    if not tasks:
        print("no scheduled tasks")
        return 0
    print(f"{'NAME':<20}  {'KIND':<10}  {'SCHEDULE':<24}  {'PAUSED':<6}  {'NEXT RUN':<25}  LAST RUN")
    for task in tasks:
        print(
            f"{task.name:<20}  {task.kind:<10}  {_schedule(task):<24}  {'yes' if task.paused else 'no':<6}  "
            f"{_when(task.next_run_at):<25}  {task.last_run_status or '-'}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    task = _with_repository(database_settings(args.project_dir), lambda repo: repo.require(args.name))
    print(json.dumps(task.model_dump(mode="json"), indent=2) if args.json else _describe(task))
    return 0


def run_pause(args: argparse.Namespace) -> int:
    task = _with_repository(database_settings(args.project_dir), lambda repo: repo.pause(args.name))
    print(f"paused {task.name}")
    return 0


def run_resume(args: argparse.Namespace) -> int:
    task = _with_repository(database_settings(args.project_dir), lambda repo: repo.resume(args.name))
    print(f"resumed {task.name}; next run {_when(task.next_run_at)}")
    return 0


def run_trigger(args: argparse.Namespace) -> int:
    settings = database_settings(args.project_dir)

    async def trigger(repo: TaskRepository) -> TaskRun | None:
        before = await repo.runs(args.name, limit=1)
        newest = before[0].id if before else 0
        await repo.trigger(args.name)
        if not args.wait:
            return None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            runs = [run for run in await repo.runs(args.name, limit=5) if run.id > newest]
            ended = [run for run in runs if run.status != "running"]
            if ended:
                return ended[-1]
            await asyncio.sleep(_WAIT_POLL_SECONDS)
        raise CliError(
            f"no run of {args.name} ended within {args.timeout:g} s (is a prefetch-scheduler running?)"
        )

    run = _with_repository(settings, trigger)
    if run is None:
        print(f"triggered {args.name}: a scheduler runs it at its next look")
        return 0
    print(_run_line(run))
    print(json.dumps(run.summary, indent=2, sort_keys=True))
    if run.status != "succeeded":
        raise CliError(f"run {run.id} of {args.name} {run.status}: {run.error or 'no error recorded'}")
    return 0


def run_history(args: argparse.Namespace) -> int:
    runs = _with_repository(
        database_settings(args.project_dir), lambda repo: repo.runs(args.name, limit=args.limit)
    )
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        return 0
    if not runs:
        print(f"{args.name} has not run yet")
        return 0
    print(f"{'RUN':>6}  {'STATUS':<11}  {'TRIGGER':<9}  {'STARTED':<25}  {'FINISHED':<25}  SUMMARY")
    for run in runs:
        print(_run_line(run))
    return 0


def run_set(args: argparse.Namespace) -> int:
    if args.cron is None and args.interval is None and args.params is None:
        raise CliError("nothing to change: give --cron, --interval or --params")
    try:
        change = TaskUpdate(cron=args.cron, interval_seconds=args.interval, params=args.params)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    try:
        task = _with_repository(
            database_settings(args.project_dir), lambda repo: repo.update(args.name, change)
        )
    except ScheduleError as exc:
        raise CliError(str(exc)) from exc
    print(_describe(task))
    return 0


def run_hold(args: argparse.Namespace) -> int:
    hold = _with_repository(
        database_settings(args.project_dir),
        lambda repo: repo.hold(args.study_uid, reason=args.reason, created_by="pacs-cli"),
    )
    print(f"retention hold on {hold.study_instance_uid}")
    return 0


def run_unhold(args: argparse.Namespace) -> int:
    removed = _with_repository(database_settings(args.project_dir), lambda repo: repo.unhold(args.study_uid))
    if not removed:
        raise CliError(f"study {args.study_uid} is not on retention hold")
    print(f"retention hold removed from {args.study_uid}")
    return 0


def run_holds(args: argparse.Namespace) -> int:
    holds = _with_repository(database_settings(args.project_dir), lambda repo: repo.holds())
    if args.json:
        print(json.dumps([h.model_dump(mode="json") for h in holds], indent=2))
        return 0
    if not holds:
        print("no study is on retention hold")
        return 0
    for hold in holds:
        print(f"{hold.study_instance_uid}  {_when(hold.created_at)}  {hold.reason or ''}")
    return 0
