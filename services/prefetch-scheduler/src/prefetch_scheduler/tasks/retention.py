"""Retention cleanup: delete studies older than their modality's retention.

A study's age is taken from its Study Date (``YYYYMMDD``), or from when it
was received when it has no valid one.  A study is kept as long as the
longest rule among its modalities says; with no rule for any of its
modalities it is kept.  Protected studies are never deleted: those on
retention hold (``pacs tasks hold``) and those with a live study lock; both
are checked again inside the deletion's transaction.  Each deleted study
leaves a "DICOM Study Deleted" audit event naming the study and its patient.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from pacs_common.audit import AuditAction, AuditEventId, AuditObject, AuditOutcome
from pacs_common.deletion import Level, StudyHeldError, StudyLockedError, delete_from_index, delete_objects
from pacs_common.tasks import RetentionParams
from prefetch_scheduler.tasks.context import RunContext, RunResult, task_actor

__all__ = ["LOCK_HOLDER", "run_retention"]

logger = logging.getLogger(__name__)

#: The holder name deletion checks locks against: any live lock protects.
LOCK_HOLDER: Final = "prefetch-scheduler/retention"
#: How many study UIDs a run summary lists.
_LISTED: Final = 200

_EXPIRED: Final = """
WITH rules AS (SELECT * FROM unnest($1::text[], $2::int[]) AS r (modality, days))
SELECT s.pk, s.study_instance_uid, s.study_date, s.modalities_in_study, m.days,
       coalesce(s.last_received_at, s.created_at) AS received_at,
       (EXISTS (SELECT 1 FROM retention_hold h WHERE h.study_instance_uid = s.study_instance_uid)
        OR EXISTS (SELECT 1 FROM study_lock l
                   WHERE l.study_instance_uid = s.study_instance_uid AND l.expires_at > clock_timestamp())
       ) AS protected
FROM study s
CROSS JOIN LATERAL (SELECT max(r.days) AS days FROM rules r WHERE r.modality = ANY (s.modalities_in_study)) m
WHERE s.pk > $3
  AND s.modalities_in_study && $1::text[]
  AND m.days IS NOT NULL
  AND CASE WHEN s.study_date ~ '^[0-9]{8}$'
           THEN s.study_date < to_char((now() AT TIME ZONE 'UTC') - make_interval(days => m.days), 'YYYYMMDD')
           ELSE coalesce(s.last_received_at, s.created_at) < now() - make_interval(days => m.days)
      END
ORDER BY s.pk
LIMIT $4
"""


async def run_retention(ctx: RunContext) -> RunResult:
    params = RetentionParams.model_validate(ctx.task.params)
    summary: dict[str, Any] = {
        "dry_run": params.dry_run,
        "rules": {rule.modality: rule.days for rule in params.rules},
        "expired": 0,
        "deleted_studies": 0,
        "deleted_instances": 0,
        "protected": 0,
        "object_delete_failures": 0,
        "studies": [],
        "protected_studies": [],
    }
    if not params.rules:
        summary["note"] = "no retention rules: nothing is deleted"
        return RunResult(summary)
    modalities = [rule.modality for rule in params.rules]
    days = [rule.days for rule in params.rules]
    after_pk = 0
    while summary["expired"] < params.max_studies_per_run:
        if ctx.should_stop():
            return RunResult(summary, completed=False)
        limit = min(params.batch_size, params.max_studies_per_run - summary["expired"])
        rows = await ctx.pool.fetch(_EXPIRED, modalities, days, after_pk, limit)
        if not rows:
            break
        for row in rows:
            after_pk = row["pk"]
            summary["expired"] += 1
            study: str = row["study_instance_uid"]
            if row["protected"]:
                _protected(summary, study)
                continue
            if params.dry_run:
                _list(summary["studies"], study)
                continue
            await _delete_study(ctx, summary, study, dict(row))
    return RunResult(summary)


def _list(listing: list[str], study: str) -> None:
    if len(listing) < _LISTED:
        listing.append(study)


def _protected(summary: dict[str, Any], study: str) -> None:
    summary["protected"] += 1
    _list(summary["protected_studies"], study)


async def _delete_study(ctx: RunContext, summary: dict[str, Any], study: str, row: dict[str, Any]) -> None:
    patients = await ctx.audit.patients_of([study])
    try:
        deleted = await delete_from_index(ctx.pool, Level.STUDY, study, holder=LOCK_HOLDER, unless_held=True)
    except (StudyLockedError, StudyHeldError):
        _protected(summary, study)
        return
    if deleted is None:  # deleted meanwhile by somebody else
        return
    details = {
        "task": ctx.task.name,
        "reason": "retention",
        "retention_days": row["days"],
        "study_date": row["study_date"],
        "modalities": list(row["modalities_in_study"]),
        "instances": len(deleted.sop_instance_uids),
    }
    await ctx.audit.record(
        AuditEventId.STUDY_DELETED,
        AuditAction.DELETE,
        AuditOutcome.SUCCESS,
        actor=task_actor(ctx.task),
        objects=[*patients, AuditObject(type="study", id=study)],
        details=details,
    )
    failures = await asyncio.to_thread(delete_objects, ctx.storage, deleted.objects)
    summary["deleted_studies"] += 1
    summary["deleted_instances"] += len(deleted.sop_instance_uids)
    summary["object_delete_failures"] += failures
    _list(summary["studies"], study)
    ctx.metrics.retention_deleted.inc()
    logger.info("retention deleted a study", extra={"study_instance_uid": study, **details})
