"""``pacs prefetch PATIENT_ID [--source AE] [--modality M] [--wait]``:
fetch a patient's prior studies from a remote PACS now.

Queues a ``prefetch`` job that the prefetch-scheduler runs (it chooses the
priors by its rules and has the remote PACS send them to the gateway);
``--wait`` follows the job and prints what became of each prior, exiting 1
when the job failed.  The same as ``POST /api/v1/prefetch``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import time
from typing import TYPE_CHECKING, Any, Final

from pacs_common.cli.common import CliError, database_settings
from pacs_common.localrun.infra import run_sync

if TYPE_CHECKING:
    import asyncpg

    from pacs_common.jobs import Job
    from pacs_common.settings import DatabaseSettings

#: What the job's ``params.trigger`` says for requests made here.
ON_DEMAND: Final = "on-demand"
_POLL_SECONDS: Final = 0.5
_FINISHED: Final = frozenset({"done", "failed", "cancelled"})


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "prefetch", help="fetch a patient's prior studies from a remote PACS now (queues a job)"
    )
    parser.add_argument("patient_id", metavar="PATIENT_ID", help="the Patient ID at the remote PACS")
    parser.add_argument(
        "--source", metavar="AE", help="query this registered node only (default: every configured source)"
    )
    parser.add_argument("--modality", metavar="M", help="prefer priors of this modality, e.g. CT")
    parser.add_argument(
        "--wait", action="store_true", help="follow the job until it ends and print its outcome"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="with --wait: give up after (default 900)",
    )
    parser.add_argument("--json", action="store_true", help="print the job as JSON")
    parser.set_defaults(handler=run_prefetch)


async def _connect(settings: DatabaseSettings) -> asyncpg.Pool:
    from pacs_common.db.pool import create_pool

    try:
        return await create_pool(
            settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}), application_name="pacs-cli"
        )
    except Exception as exc:
        from pacs_common.localrun.infra import describe_error

        raise CliError(f"database unreachable: {describe_error(exc)}") from exc


def job_params(patient_id: str, source: str | None, modality: str | None) -> dict[str, Any]:
    """The ``job.params`` of an on-demand prefetch."""
    params: dict[str, Any] = {"patient_id": patient_id, "trigger": ON_DEMAND}
    if source:
        params["source"] = source
    if modality:
        params["modality"] = modality.upper()
    return params


async def _create(args: argparse.Namespace) -> Job:
    from pacs_common.jobs import JobKind, JobRepository
    from pacs_common.nodes import RemoteNodeRepository

    patient_id = args.patient_id.strip()
    if not patient_id:
        raise CliError("PATIENT_ID must not be blank")
    pool = await _connect(database_settings(args.project_dir))
    try:
        if args.source and await RemoteNodeRepository(pool).get(args.source) is None:
            raise CliError(f"{args.source} is not a registered node (see `pacs node list`)")
        return await JobRepository(pool).create(
            JobKind.PREFETCH, job_params(patient_id, args.source, args.modality), created_by=_user()
        )
    finally:
        await pool.close()


async def _follow(args: argparse.Namespace, job_id: int) -> Job:
    from pacs_common.jobs import JobRepository

    pool = await _connect(database_settings(args.project_dir))
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            job = await JobRepository(pool).get(job_id)
            if job is None:
                raise CliError(f"job {job_id} disappeared")
            if job.state in _FINISHED:
                return job
            if time.monotonic() > deadline:
                raise CliError(f"job {job_id} still {job.state} after {args.timeout:g}s")
            await asyncio.sleep(_POLL_SECONDS)
    finally:
        await pool.close()


def _user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def describe(job: Job) -> str:
    """The job's outcome for a human: its state, then one line per prior."""
    params = job.params
    lines = [f"prefetch job {job.id} for patient {params.get('patient_id')}: {job.state}"]
    if job.error:
        lines.append(f"  error: {job.error}")
    elif job.state not in _FINISHED and params.get("last_error"):
        lines.append(f"  last attempt failed: {params['last_error']}")
    studies = params.get("studies")
    if studies is None:
        if job.state == "done":
            lines.append("  no priors queried")
        return "\n".join(lines)
    if not studies:
        lines.append("  no priors to fetch")
    for study in studies:
        modalities = ",".join(study.get("modalities") or []) or "-"
        lines.append(
            f"  {study.get('study_date') or '--------'}  {modalities:<8}  {study.get('outcome'):<13}  "
            f"{study.get('study_instance_uid')}  {study.get('detail') or ''}".rstrip()
        )
    return "\n".join(lines)


def run_prefetch(args: argparse.Namespace) -> int:
    job = run_sync(lambda: _create(args))
    if not args.wait:
        if args.json:
            print(json.dumps(job.model_dump(mode="json"), indent=2))
        else:
            print(f"prefetch job {job.id} queued for patient {job.params['patient_id']}")
        return 0
    if not args.json:
        print(f"prefetch job {job.id} queued for patient {job.params['patient_id']}; waiting…", flush=True)
    job = run_sync(lambda: _follow(args, job.id))
    print(json.dumps(job.model_dump(mode="json"), indent=2) if args.json else describe(job))
    return 0 if job.state == "done" else 1
