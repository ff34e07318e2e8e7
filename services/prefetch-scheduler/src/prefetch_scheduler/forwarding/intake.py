"""From an event to forward items: which rules match, what to queue.

An ``instance.stored`` event is matched against the enabled
``instance.stored`` rules with the instance's attributes from the index; a
``study.stable`` event against the ``study.stable`` rules, each of which
forwards every instance of the study when any of them meets its condition.
The calling AE title is the event's (``source.calling_ae_title``), else the
one the index recorded.

All items of one event are inserted in one transaction, and each
(rule, destination, study) gets one running ``forward`` job that the items
join.  Nothing is queued twice: not while a destination has the instance
queued or being sent, and not when it was sent the same content already
(``content_sha256``), so redelivered events, re-sent identical instances
and a study that becomes stable again do not forward again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import asyncpg

from pacs_common.jobs import JobKind
from pacs_common.messaging.models import InstanceStored, StudyStable
from pacs_common.routing import RoutingRule, RoutingRuleRepository, RoutingTrigger
from prefetch_scheduler.forwarding.metrics import ForwardMetrics
from prefetch_scheduler.forwarding.queue import refresh_jobs

if TYPE_CHECKING:
    from prefetch_scheduler.forwarding.queue import Connection

__all__ = ["IndexedInstance", "Intake", "plan"]

logger = logging.getLogger(__name__)

#: instance.stored outcomes that put new content in the index.
_NEW_CONTENT: Final = frozenset({"created", "replaced"})
_JOB_CREATOR: Final = "routing"

_INSTANCES_SQL: Final = """
    SELECT i.sop_instance_uid, i.sop_class_uid, i.source_ae_title, i.content_sha256,
           se.modality, se.body_part_examined, st.study_instance_uid, st.study_description
    FROM instance i
    JOIN series se ON se.pk = i.series_fk
    JOIN study st ON st.pk = se.study_fk
"""


@dataclass(frozen=True)
class IndexedInstance:
    """What the rules look at, as the index has it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    content_sha256: str
    modality: str | None
    body_part_examined: str | None
    study_description: str | None
    source_ae_title: str | None


def _instance(row: asyncpg.Record) -> IndexedInstance:
    return IndexedInstance(
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_instance_uid=row["study_instance_uid"],
        content_sha256=row["content_sha256"],
        modality=row["modality"],
        body_part_examined=row["body_part_examined"],
        study_description=row["study_description"],
        source_ae_title=row["source_ae_title"],
    )


def _matches(rule: RoutingRule, instance: IndexedInstance, calling_ae_title: str | None) -> bool:
    return rule.matches(
        modality=instance.modality,
        calling_ae_title=calling_ae_title if calling_ae_title is not None else instance.source_ae_title,
        study_description=instance.study_description,
        sop_class_uid=instance.sop_class_uid,
        body_part_examined=instance.body_part_examined,
    )


def plan(
    rules: Sequence[RoutingRule],
    instances: Sequence[IndexedInstance],
    *,
    whole_study: bool,
    calling_ae_title: str | None = None,
) -> dict[tuple[int, str], list[IndexedInstance]]:
    """(rule id, destination) → the instances to queue, rules in evaluation
    order; an instance goes to a destination once, for the first rule that
    sends it there."""
    planned: dict[tuple[int, str], list[IndexedInstance]] = {}
    taken: set[tuple[str, str]] = set()
    for rule in rules:
        matched = [i for i in instances if _matches(rule, i, calling_ae_title)]
        chosen = list(instances) if whole_study and matched else matched
        for destination in rule.destinations:
            fresh = [i for i in chosen if (destination, i.sop_instance_uid) not in taken]
            taken.update((destination, i.sop_instance_uid) for i in fresh)
            if fresh:
                planned[(rule.id, destination)] = fresh
    return planned


class Intake:
    """Handles one event: rules → forward items and jobs, in one transaction."""

    def __init__(self, pool: asyncpg.Pool, metrics: ForwardMetrics) -> None:
        self._pool = pool
        self._metrics = metrics

    async def handle(self, event: InstanceStored | StudyStable) -> int:
        """Queue what the rules say; returns how many items were queued."""
        trigger = (
            RoutingTrigger.INSTANCE_STORED
            if isinstance(event, InstanceStored)
            else RoutingTrigger.STUDY_STABLE
        )
        if isinstance(event, InstanceStored) and event.outcome not in _NEW_CONTENT:
            self._metrics.events.labels(str(trigger), "ignored").inc()
            return 0
        rules = await RoutingRuleRepository(self._pool).list(enabled_only=True, trigger=trigger)
        if not rules:
            self._metrics.events.labels(str(trigger), "unmatched").inc()
            return 0
        queued: dict[str, int] = {}
        async with self._pool.acquire() as connection, connection.transaction():
            if isinstance(event, InstanceStored):
                rows = await connection.fetch(
                    f"{_INSTANCES_SQL} WHERE i.sop_instance_uid = $1", event.sop_instance_uid
                )
                calling = event.source.calling_ae_title
                whole_study = False
            else:
                rows = await connection.fetch(
                    f"{_INSTANCES_SQL} WHERE st.study_instance_uid = $1 ORDER BY se.pk, i.instance_number, i.pk",
                    event.study_instance_uid,
                )
                calling = None
                whole_study = True
            instances = [_instance(row) for row in rows]
            planned = plan(rules, instances, whole_study=whole_study, calling_ae_title=calling)
            by_id = {rule.id: rule for rule in rules}
            jobs: list[int] = []
            for (rule_id, destination), chosen in planned.items():
                count, job_id = await _queue(connection, by_id[rule_id], destination, chosen)
                if count:
                    queued[destination] = queued.get(destination, 0) + count
                    jobs.append(job_id)
            await refresh_jobs(connection, jobs)
        for destination, count in queued.items():
            self._metrics.enqueued.labels(destination).inc(count)
        self._metrics.events.labels(str(trigger), "matched" if queued else "unmatched").inc()
        if queued:
            logger.info(
                "forwarding queued",
                extra={"trigger": str(trigger), "queued": queued, "event": str(event.message_id)},
            )
        return sum(queued.values())


async def _queue(
    connection: Connection, rule: RoutingRule, destination: str, instances: Sequence[IndexedInstance]
) -> tuple[int, int]:
    """Insert the items not queued, sending or sent already and attach them
    to the rule's running job for the study (created when there is none)."""
    study = instances[0].study_instance_uid
    ids: list[int] = [
        row["id"]
        for row in await connection.fetch(
            """
            INSERT INTO forward_item (destination, study_instance_uid, sop_instance_uid, content_sha256, rule_id)
            SELECT $1, $2, u.sop, u.sha, $3
            FROM unnest($4::text[], $5::text[]) AS u(sop, sha)
            WHERE NOT EXISTS (
                SELECT 1 FROM forward_item f
                WHERE f.sop_instance_uid = u.sop AND f.destination = $1
                  AND (f.state IN ('queued', 'sending') OR (f.state = 'done' AND f.content_sha256 = u.sha))
            )
            ON CONFLICT (destination, sop_instance_uid) WHERE state IN ('queued', 'sending') DO NOTHING
            RETURNING id
            """,
            destination,
            study,
            rule.id,
            [i.sop_instance_uid for i in instances],
            [i.content_sha256 for i in instances],
        )
    ]
    if not ids:
        return 0, 0
    job_id = await _running_job(connection, rule, destination, study)
    await connection.execute("UPDATE forward_item SET job_id = $1 WHERE id = ANY($2::bigint[])", job_id, ids)
    return len(ids), job_id


async def _running_job(connection: Connection, rule: RoutingRule, destination: str, study: str) -> int:
    """The running forward job of (rule, destination, study), or a new one;
    an advisory lock keeps two replicas from creating one each."""
    params = {"rule_id": rule.id, "destination": destination, "study_instance_uid": study}
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        f"pacs.forward.job:{rule.id}:{destination}:{study}",
    )
    job_id: int | None = await connection.fetchval(
        """
        SELECT id FROM job WHERE kind = $1 AND state = 'running' AND params @> $2::jsonb
        ORDER BY id DESC LIMIT 1 FOR UPDATE
        """,
        str(JobKind.FORWARD),
        params,
    )
    if job_id is not None:
        return job_id
    created: int = await connection.fetchval(
        """
        INSERT INTO job (kind, params, created_by, state, attempts, started_at, progress_total)
        VALUES ($1, $2, $3, 'running', 1, now(), 0) RETURNING id
        """,
        str(JobKind.FORWARD),
        {**params, "rule": rule.name, "trigger": str(rule.trigger)},
        _JOB_CREATOR,
    )
    return created
