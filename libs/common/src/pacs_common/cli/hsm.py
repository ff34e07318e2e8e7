"""``pacs hsm run|status``: storage tier migration by hand.

``run`` queues a migration job (an hsm-migrator replica runs it); with
``--wait`` it follows the job to its end and exits 1 when it failed.
Without ``--to`` the job applies the configured policy rules now; with
``--to`` it moves the matching instances there whatever their age.
``status`` shows what each tier holds, the open moves and the last passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from pacs_common.cli.common import CliError, database_settings
from pacs_common.localrun.infra import run_sync

if TYPE_CHECKING:
    import asyncpg

    from pacs_common.settings import DatabaseSettings

T = TypeVar("T")

_FINAL_STATES = frozenset({"done", "failed", "cancelled"})
_POLL_SECONDS = 0.5


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("hsm", help="storage tier migration: run a pass, show the tiers")
    commands = parser.add_subparsers(dest="hsm_command", metavar="{run,status}", required=True)

    run = commands.add_parser("run", help="queue a migration job (policy rules, or --to a tier)")
    run.add_argument("--from", dest="from_tier", metavar="TIER", help="only instances now in this tier")
    run.add_argument("--to", dest="to_tier", metavar="TIER", help="move to this tier, whatever the rules say")
    run.add_argument(
        "--study",
        dest="studies",
        action="append",
        metavar="UID",
        help="only this study (repeatable)",
    )
    run.add_argument("--dry-run", action="store_true", help="count what would move; move nothing")
    run.add_argument("--wait", action="store_true", help="follow the job to its end")
    run.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS", help="for --wait (3600)")
    run.add_argument("--json", action="store_true", help="print the job as JSON")
    run.set_defaults(handler=run_run)

    status = commands.add_parser("status", help="instances and bytes per tier, open moves, last passes")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_status)


def _with_pool(settings: DatabaseSettings, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work`` on a small pool (JSON codecs set up) for one command."""

    async def call() -> T:
        import asyncpg

        from pacs_common.db.pool import create_pool
        from pacs_common.localrun.infra import describe_error

        small = settings.model_copy(update={"pool_min_size": 0, "pool_max_size": 2})
        try:
            pool = await create_pool(small, application_name="pacs-cli")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise CliError(f"database unreachable: {describe_error(exc)}") from exc
        try:
            return await work(pool)
        finally:
            await pool.close()

    return run_sync(call)


def _job_line(job: Any) -> str:
    total = "?" if job.progress_total is None else str(job.progress_total)
    line = f"job {job.id} {job.state}: {job.progress_done}/{total}"
    return f"{line} ({job.error})" if job.error else line


def run_run(args: argparse.Namespace) -> int:
    from pacs_common.hsm.jobs import MigrationJobParams, create_migration_job
    from pacs_common.jobs import JobRepository

    try:
        params = MigrationJobParams(
            from_tier=args.from_tier,
            to_tier=args.to_tier,
            study_instance_uids=args.studies,
            dry_run=args.dry_run,
        )
    except ValidationError as exc:
        message = "; ".join(str(error.get("msg", "")) for error in exc.errors())
        raise CliError(f"invalid migration: {message}") from exc
    settings = database_settings(args.project_dir)

    async def create(pool: asyncpg.Pool) -> Any:
        return await create_migration_job(pool, params, created_by="pacs-cli")

    job = _with_pool(settings, create)
    if not args.wait:
        if args.json:
            print(job.model_dump_json(indent=2))
        else:
            print(
                f"queued migration job {job.id}; follow it with `pacs hsm run --wait` or GET /api/v1/jobs/{job.id}"
            )
        return 0

    async def follow(pool: asyncpg.Pool) -> Any:
        jobs = JobRepository(pool)
        deadline = time.monotonic() + args.timeout
        last = ""
        while True:
            current = await jobs.get(job.id)
            if current is None:
                raise CliError(f"job {job.id} disappeared")
            line = _job_line(current)
            if line != last and not args.json:
                print(line, flush=True)
                last = line
            if current.state in _FINAL_STATES:
                return current
            if time.monotonic() > deadline:
                raise CliError(f"job {job.id} still {current.state} after {args.timeout:g}s")
            await asyncio.sleep(_POLL_SECONDS)

    final = _with_pool(settings, follow)
    if args.json:
        print(final.model_dump_json(indent=2))
    if final.state != "done":
        print(
            f"pacs hsm run: job {final.id} {final.state}: {final.error or ''}".rstrip(": "), file=sys.stderr
        )
        return 1
    return 0


def run_status(args: argparse.Namespace) -> int:
    from pacs_common.hsm.jobs import recent_runs
    from pacs_common.hsm.tiers import tier_statistics
    from pacs_common.settings import StorageTiersSettings

    try:
        configured = StorageTiersSettings().tiers
    except ValidationError as exc:
        raise CliError(f"invalid PACS_STORAGE_TIERS: {exc.errors()[0].get('msg', '')}") from exc
    settings = database_settings(args.project_dir)

    async def fetch(connection: asyncpg.Pool) -> dict[str, Any]:
        tiers = await tier_statistics(connection, configured)
        open_moves = await connection.fetch(
            """
            SELECT source_tier, target_tier, state, count(*) AS moves FROM hsm_move
            WHERE state IN ('pending', 'copied', 'verified', 'switched')
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            """
        )
        runs = await recent_runs(connection, limit=5)
        return {
            "tiers": [t.model_dump(mode="json") for t in tiers],
            "open_moves": [dict(row) for row in open_moves],
            "runs": [r.model_dump(mode="json") for r in runs],
        }

    status = _with_pool(settings, fetch)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{'TIER':<12}  {'INSTANCES':>10}  {'BYTES':>16}")
    for tier in status["tiers"]:
        note = "" if tier["configured"] else "  (not configured here)"
        print(f"{tier['tier']:<12}  {tier['instances']:>10}  {tier['bytes']:>16}{note}")
    for move in status["open_moves"]:
        print(f"open moves {move['source_tier']}→{move['target_tier']} {move['state']}: {move['moves']}")
    for run in status["runs"]:
        end = run["finished_at"] or "running"
        print(
            f"pass {run['id']} ({run['trigger']}{' dry-run' if run['dry_run'] else ''}) {run['started_at']} → "
            f"{end}: planned {run['planned']}, moved {run['moved']} ({run['moved_bytes']} bytes), "
            f"failed {run['failed']}"
        )
    return 0
