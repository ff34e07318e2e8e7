"""``pacs sync add|list|show|remove|run|history``: PACS-to-PACS sync relations.

A relation names a registered node (``pacs node add``), the direction
(pull, push or both), which studies take part (modalities, a study date
range, patient IDs), when it runs (every N seconds, a cron expression,
continuously, or only when asked) and what a conflict becomes.  The
prefetch-scheduler runs the relations; ``pacs sync run NAME --wait`` asks
for a run now and waits for its outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from pacs_common.cli.common import CliError, connect_database, database_settings
from pacs_common.localrun.infra import run_sync
from pacs_common.settings import DatabaseSettings
from pacs_common.sync import (
    ConflictPolicy,
    Direction,
    RelationExistsError,
    RelationNotFoundError,
    RunState,
    ScheduleKind,
    SyncFilter,
    SyncRelation,
    SyncRelationCreate,
    SyncRepository,
    SyncRun,
)

__all__ = ["add_parser", "main"]

T = TypeVar("T")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("sync", help="PACS-to-PACS sync relations")
    commands = parser.add_subparsers(
        dest="sync_command", metavar="{add,list,show,remove,run,history}", required=True
    )

    add = commands.add_parser("add", help="add a sync relation to a registered node")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--remote", required=True, metavar="AE_TITLE", help="the node (pacs node add)")
    add.add_argument("--direction", choices=[d.value for d in Direction], default=Direction.PULL.value)
    add.add_argument("--modality", action="append", default=[], help="only studies with this modality")
    add.add_argument("--from", dest="date_from", metavar="YYYYMMDD", help="studies on or after this date")
    add.add_argument("--to", dest="date_to", metavar="YYYYMMDD", help="studies on or before this date")
    add.add_argument("--patient-id", action="append", default=[], help="only this patient's studies")
    when = add.add_mutually_exclusive_group()
    when.add_argument("--interval", type=int, metavar="SECONDS", help="run every SECONDS")
    when.add_argument("--cron", metavar="EXPR", help="run on a 5-field cron schedule (UTC)")
    when.add_argument("--continuous", action="store_true", help="run again as soon as a run ends")
    add.add_argument(
        "--conflict-policy",
        choices=[p.value for p in ConflictPolicy],
        default=ConflictPolicy.KEEP_BOTH_REPORT.value,
    )
    add.add_argument(
        "--compare-content",
        action="store_true",
        help="also compare the content of instances both sides hold (C-GET, sha256): finds conflicts",
    )
    add.add_argument("--disabled", action="store_true", help="add it without running it")
    add.set_defaults(handler=run_add)

    listing = commands.add_parser("list", help="list sync relations")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=run_list)

    show = commands.add_parser("show", help="show a relation, its last run and its conflicts")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)

    remove = commands.add_parser("remove", help="remove a relation (and its history)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=run_remove)

    run = commands.add_parser("run", help="run a relation now")
    run.add_argument("name", metavar="NAME")
    run.add_argument("--wait", action="store_true", help="wait for the run to end and print it")
    run.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    run.set_defaults(handler=run_run)

    history = commands.add_parser("history", help="the relation's runs, newest first")
    history.add_argument("name", metavar="NAME")
    history.add_argument("--limit", type=int, default=20)
    history.add_argument("--json", action="store_true", help="machine-readable output")
    history.set_defaults(handler=run_history)


def _with_repository(settings: DatabaseSettings, work: Callable[[SyncRepository], Awaitable[T]]) -> T:
    async def call() -> T:
        connection = await connect_database(settings)
        try:
            return await work(SyncRepository(connection))
        finally:
            await connection.close()

    return run_sync(call)


def _validation_message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", exc)).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _schedule(relation: SyncRelation) -> str:
    if relation.schedule_kind is ScheduleKind.INTERVAL:
        return f"every {relation.interval_seconds} s"
    if relation.schedule_kind is ScheduleKind.CRON:
        return f"cron {relation.cron_expression}"
    return str(relation.schedule_kind)


def _filter(where: SyncFilter) -> str:
    parts = []
    if where.modalities:
        parts.append("modalities " + ",".join(where.modalities))
    if where.study_date_from or where.study_date_to:
        parts.append(f"dates {where.date_range()}")
    if where.patient_ids:
        parts.append("patients " + ",".join(where.patient_ids))
    return "; ".join(parts) or "every study"


def _describe_run(run: SyncRun) -> str:
    ended = run.finished_at.isoformat() if run.finished_at else "-"
    line = (
        f"run {run.id}: {run.state} ({run.trigger}) started {run.started_at.isoformat()} ended {ended}\n"
        f"  studies compared {run.studies_compared}, different {run.studies_different}; "
        f"pulled {run.instances_pulled}, pushed {run.instances_pushed}, failed {run.instances_failed}; "
        f"conflicts {run.conflicts}"
    )
    return line + (f"\n  error: {run.error}" if run.error else "")


def run_add(args: argparse.Namespace) -> int:
    kind = ScheduleKind.MANUAL
    if args.interval is not None:
        kind = ScheduleKind.INTERVAL
    elif args.cron is not None:
        kind = ScheduleKind.CRON
    elif args.continuous:
        kind = ScheduleKind.CONTINUOUS
    try:
        relation = SyncRelationCreate(
            name=args.name,
            remote_ae_title=args.remote,
            direction=Direction(args.direction),
            filter=SyncFilter(
                modalities=tuple(args.modality),
                study_date_from=args.date_from,
                study_date_to=args.date_to,
                patient_ids=tuple(args.patient_id),
            ),
            schedule_kind=kind,
            interval_seconds=args.interval,
            cron_expression=args.cron,
            conflict_policy=ConflictPolicy(args.conflict_policy),
            compare_content=args.compare_content,
            enabled=not args.disabled,
        )
    except ValidationError as exc:
        raise CliError(_validation_message(exc)) from exc
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    try:
        added = _with_repository(database_settings(args.project_dir), lambda repo: repo.add(relation))
    except RelationExistsError as exc:
        raise CliError(str(exc)) from exc
    print(
        f"added sync relation {added.name}: {added.direction} with {added.remote_ae_title}, {_schedule(added)}"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    relations = _with_repository(database_settings(args.project_dir), lambda repo: repo.list())
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in relations], indent=2))
        return 0
    if not relations:
        print("no sync relations (add one with `pacs sync add`)")
        return 0
    print(f"{'NAME':<24}  {'REMOTE':<16}  {'DIRECTION':<9}  {'SCHEDULE':<24}  FILTER")
    for r in relations:
        name = r.name if r.enabled else f"{r.name} (off)"
        print(
            f"{name:<24}  {r.remote_ae_title:<16}  {r.direction:<9}  {_schedule(r):<24}  {_filter(r.filter)}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    async def work(repo: SyncRepository) -> dict[str, Any]:
        relation = await repo.require(args.name)
        return {
            "relation": relation,
            "runs": await repo.history(args.name, limit=1),
            "conflicts": await repo.conflicts(args.name, limit=50),
        }

    try:
        found = _with_repository(database_settings(args.project_dir), work)
    except RelationNotFoundError as exc:
        raise CliError(str(exc)) from exc
    relation: SyncRelation = found["relation"]
    if args.json:
        print(
            json.dumps(
                {
                    **relation.model_dump(mode="json"),
                    "last_run": found["runs"][0].model_dump(mode="json") if found["runs"] else None,
                    "conflicts": [c.model_dump(mode="json") for c in found["conflicts"]],
                },
                indent=2,
            )
        )
        return 0
    print(f"name             {relation.name}{'' if relation.enabled else '  (disabled)'}")
    print(f"remote           {relation.remote_ae_title}")
    print(f"direction        {relation.direction}")
    print(f"filter           {_filter(relation.filter)}")
    print(f"schedule         {_schedule(relation)}")
    print(f"next run         {relation.next_run_at.isoformat() if relation.next_run_at else '-'}")
    print(f"conflict policy  {relation.conflict_policy}")
    print(f"compare content  {'yes' if relation.compare_content else 'no'}")
    if found["runs"]:
        print("last " + _describe_run(found["runs"][0]))
    for conflict in found["conflicts"]:
        print(f"conflict {conflict.sop_instance_uid}: {conflict.resolution}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    removed = _with_repository(database_settings(args.project_dir), lambda repo: repo.remove(args.name))
    if not removed:
        raise CliError(f"no sync relation {args.name}")
    print(f"removed sync relation {args.name}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    settings = database_settings(args.project_dir)

    async def request(repo: SyncRepository) -> int:
        runs = await repo.history(args.name, limit=1)
        await repo.request_run(args.name)
        return runs[0].id if runs else 0

    try:
        last = _with_repository(settings, request)
    except RelationNotFoundError as exc:
        raise CliError(str(exc)) from exc
    if not args.wait:
        print(f"run of {args.name} requested (a prefetch-scheduler replica picks it up)")
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        run = _with_repository(settings, lambda repo: repo.latest_run_after(args.name, last))
        if run is not None and run.state is not RunState.RUNNING:
            print(_describe_run(run))
            return 0 if run.state is RunState.SUCCEEDED else 1
        if time.monotonic() > deadline:
            raise CliError(
                f"no run of {args.name} ended within {args.timeout:g} s (is a prefetch-scheduler running?)"
            )
        time.sleep(0.5)


def run_history(args: argparse.Namespace) -> int:
    runs = _with_repository(
        database_settings(args.project_dir), lambda repo: repo.history(args.name, limit=args.limit)
    )
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs of {args.name}")
    for run in runs:
        print(_describe_run(run))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pacs_common.cli.sync ...``: the same commands without ``pacs``."""
    parser = argparse.ArgumentParser(prog="pacs")
    parser.add_argument("-C", "--project-dir", type=Path, default=Path.cwd(), metavar="DIR")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as exc:
        print(f"pacs sync: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
