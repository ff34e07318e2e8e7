"""The prefetch's PostgreSQL side: turning worklist items into jobs, taking
jobs, recording their progress, putting them back for a retry.

Everything that must hold across replicas is a statement here:

* one job per worklist item: ``prefetch_request`` is unique per item, and
  the request row and its job are written in one transaction;
* one replica per job: claiming is ``FOR UPDATE SKIP LOCKED``;
* one running job per patient (so two requests for one patient never move
  the same study at once): claims take turns under a transaction-scoped
  advisory lock, and a job whose patient has a running job is not taken;
* a job whose replica died is taken over once it has not reported for
  ``stale_after`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Final, cast

import asyncpg

from pacs_common.jobs import Job, JobKind, JobRepository
from prefetch_scheduler.prefetch.models import PrefetchParams, Trigger
from prefetch_scheduler.prefetch.selection import body_part_of_item, parse_dicom_date

__all__ = ["CREATED_BY", "DueItem", "PrefetchRepository", "TriggerWindow", "trigger_of"]

CREATED_BY: Final = "prefetch-scheduler"
# pg_advisory_xact_lock key of the claim: "PACSPFCL" as a bigint.
_CLAIM_LOCK_KEY: Final = int.from_bytes(b"PACSPFCL", "big")
_FINISHED_STEPS: Final = ["COMPLETED", "DISCONTINUED"]
_SCAN_LIMIT: Final = 200

_JOB_COLUMNS: Final = (
    "id, kind, state, progress_done, progress_total, error, params, attempts, created_by, "
    "created_at, updated_at, started_at, finished_at"
)

_CLAIM: Final = f"""
    UPDATE job SET state = 'running', attempts = attempts + 1, started_at = now(), updated_at = now(),
        params = jsonb_set(params, '{{attempt}}', to_jsonb(coalesce((params->>'attempt')::int, 0) + 1))
    WHERE id = (
        SELECT j.id FROM job j
        WHERE j.state = 'queued' AND j.kind = 'prefetch'
          AND coalesce((j.params->>'next_attempt_at')::timestamptz, '-infinity') <= now()
          AND NOT EXISTS (
              SELECT 1 FROM job r
              WHERE r.kind = 'prefetch' AND r.state = 'running'
                AND r.params->>'patient_id' = j.params->>'patient_id')
        ORDER BY j.created_at, j.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED)
    RETURNING {_JOB_COLUMNS}
"""


@dataclass(frozen=True)
class TriggerWindow:
    """When a worklist item calls for a prefetch (see PrefetchSettings)."""

    on_create: bool
    created_within: timedelta
    lead_time: timedelta
    past_grace: timedelta


@dataclass(frozen=True)
class DueItem:
    pk: int
    trigger: Trigger
    params: PrefetchParams


def _start_of(sps_date: str | None, sps_time: str | None) -> datetime | None:
    day = parse_dicom_date(sps_date)
    if day is None:
        return None
    digits = "".join(c for c in (sps_time or "").split(".")[0] if c.isdigit())
    digits = (digits + "000000")[:6]
    try:
        clock = time(int(digits[:2]), int(digits[2:4]), int(digits[4:6]))
    except ValueError:
        clock = time()
    return datetime.combine(day, clock)


def trigger_of(
    record: asyncpg.Record, window: TriggerWindow, now: datetime, local_now: datetime
) -> Trigger | None:
    """Why this worklist row calls for a prefetch now, if it does: just
    created, or its scheduled start (local time, as DICOM has it) is near."""
    if window.on_create and record["created_at"] >= now - window.created_within:
        return "created"
    start = _start_of(record["sps_start_date"], record["sps_start_time"])
    if start is not None and local_now - window.past_grace <= start <= local_now + window.lead_time:
        return "due"
    return None


def _yyyymmdd(day: date) -> str:
    return f"{day:%Y%m%d}"


class PrefetchRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # -- triggers --------------------------------------------------------------

    async def due_items(self, window: TriggerWindow) -> list[DueItem]:
        """Worklist items that call for a prefetch and have none yet."""
        local_now = datetime.now()
        records = await self._pool.fetch(
            """
            SELECT w.pk, w.patient_id, w.issuer_of_patient_id, w.study_instance_uid, w.modality,
                   w.sps_start_date, w.sps_start_time, w.attributes, w.created_at, now() AS db_now
            FROM worklist_item w
            WHERE w.patient_id <> ''
              AND w.sps_status <> ALL($1::text[])
              AND NOT EXISTS (SELECT 1 FROM prefetch_request r WHERE r.worklist_item_fk = w.pk)
              AND (($2 AND w.created_at >= now() - make_interval(secs => $3))
                   OR w.sps_start_date BETWEEN $4 AND $5)
            ORDER BY w.pk
            LIMIT $6
            """,
            _FINISHED_STEPS,
            window.on_create,
            window.created_within.total_seconds(),
            _yyyymmdd((local_now - window.past_grace).date()),
            _yyyymmdd((local_now + window.lead_time).date()),
            _SCAN_LIMIT,
        )
        due: list[DueItem] = []
        for record in records:
            trigger = trigger_of(record, window, record["db_now"], local_now)
            if trigger is None:
                continue
            params = PrefetchParams(
                patient_id=record["patient_id"],
                issuer_of_patient_id=record["issuer_of_patient_id"] or None,
                modality=record["modality"],
                body_part=body_part_of_item(record["attributes"]),
                exclude_study_uid=record["study_instance_uid"],
                worklist_item=record["pk"],
                trigger=trigger,
            )
            due.append(DueItem(record["pk"], trigger, params))
        return due

    async def request(self, item: DueItem) -> Job | None:
        """The item's prefetch job, created unless a replica did first (None then)."""
        async with self._pool.acquire() as connection, connection.transaction():
            try:
                request_id = await connection.fetchval(
                    """
                    INSERT INTO prefetch_request (worklist_item_fk, patient_id, trigger)
                    VALUES ($1, $2, $3)
                    ON CONFLICT (worklist_item_fk) DO NOTHING
                    RETURNING id
                    """,
                    item.pk,
                    item.params.patient_id,
                    item.trigger,
                )
            except asyncpg.ForeignKeyViolationError:
                return None  # the item was removed meanwhile
            if request_id is None:
                return None
            job = await JobRepository(cast(asyncpg.Connection, connection)).create(
                JobKind.PREFETCH, item.params.dump(), created_by=CREATED_BY
            )
            await connection.execute(
                "UPDATE prefetch_request SET job_id = $2 WHERE id = $1", request_id, job.id
            )
            return job

    # -- the jobs --------------------------------------------------------------

    async def claim(self) -> Job | None:
        """A queued prefetch job that is due and whose patient has no running
        one, now running (attempt counted); None when there is none."""
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1::bigint)", _CLAIM_LOCK_KEY)
            row = await connection.fetchrow(_CLAIM)
        return None if row is None else Job.model_validate(dict(row))

    async def save(self, job_id: int, params: PrefetchParams, done: int, total: int | None) -> bool:
        """Record what the job knows so far; False once it is no longer running (cancelled)."""
        result: str = await self._pool.execute(
            """
            UPDATE job SET params = $2::jsonb, progress_done = $3, progress_total = $4, updated_at = now()
            WHERE id = $1 AND state = 'running'
            """,
            job_id,
            params.dump(),
            done,
            total,
        )
        return result != "UPDATE 0"

    async def touch(self, job_id: int) -> bool:
        """The heartbeat of a running job; False once it is no longer running."""
        result: str = await self._pool.execute(
            "UPDATE job SET updated_at = now() WHERE id = $1 AND state = 'running'", job_id
        )
        return result != "UPDATE 0"

    async def requeue(self, job_id: int, params: PrefetchParams) -> bool:
        """Back to queued (``params`` say when it is due again); False when it was not running."""
        result: str = await self._pool.execute(
            "UPDATE job SET state = 'queued', params = $2::jsonb, updated_at = now() "
            "WHERE id = $1 AND state = 'running'",
            job_id,
            params.dump(),
        )
        return result != "UPDATE 0"

    async def requeue_stale(self, stale_after: timedelta) -> list[int]:
        """Running jobs nobody reported on for ``stale_after`` (their replica
        died): queued again, to be taken over."""
        rows = await self._pool.fetch(
            """
            UPDATE job SET state = 'queued', updated_at = now(),
                params = params || jsonb_build_object('last_error', 'the scheduler running it stopped reporting')
            WHERE kind = 'prefetch' AND state = 'running' AND updated_at < now() - make_interval(secs => $1)
            RETURNING id
            """,
            stale_after.total_seconds(),
        )
        return [row["id"] for row in rows]

    # -- the index -------------------------------------------------------------

    async def local_instances(self, study_instance_uid: str) -> int | None:
        """How many instances of the study the index holds (None: no such study)."""
        value: int | None = await self._pool.fetchval(
            "SELECT number_of_study_related_instances FROM study WHERE study_instance_uid = $1",
            study_instance_uid,
        )
        return value
