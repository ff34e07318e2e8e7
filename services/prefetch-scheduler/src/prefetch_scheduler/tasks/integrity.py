"""Integrity verification: re-hash stored objects and compare them with the
index (size and sha256 of ``instance_location``).

Each run checks up to ``max_objects_per_run`` objects in batches, in the
order of the index, and keeps its cursor in the task's state after every
batch: the next run (or the run after an interruption) continues there,
and past the last object the next run starts over.  A missing object or a
mismatch is logged at ERROR, counted in ``pacs_integrity_mismatches_total``
and listed in the run's summary (SOP Instance UID, tier, key, expected and
actual values), and the run leaves a Security Alert audit event.  Objects in
an archive tier (that cannot be read before a restore) are skipped, not
failures.  A problem whose index row changed meanwhile (moved to another
tier, deleted) is not reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import asyncpg

from pacs_common.audit import AuditAction, AuditEventId, AuditObject, AuditOutcome
from pacs_common.storage import (
    ObjectArchivedError,
    ObjectNotFoundError,
    StorageError,
    StorageRegistry,
    sha256_of,
)
from pacs_common.tasks import IntegrityParams
from prefetch_scheduler.tasks.context import RunContext, RunResult, task_actor

__all__ = ["Finding", "run_integrity"]

logger = logging.getLogger(__name__)

CURSOR: Final = "cursor"
_PROBLEMS: Final = ("missing", "mismatch")

_BATCH: Final = """
SELECT l.instance_fk, i.sop_instance_uid, l.tier, l.key, l.size, l.sha256
FROM instance_location l JOIN instance i ON i.pk = l.instance_fk
WHERE l.instance_fk > $1
ORDER BY l.instance_fk
LIMIT $2
"""
_CURRENT: Final = "SELECT tier, key, sha256 FROM instance_location WHERE instance_fk = $1"

Kind = Literal["ok", "missing", "mismatch", "archived", "error", "unknown_tier"]


@dataclass(frozen=True, slots=True)
class Finding:
    instance_fk: int
    sop_instance_uid: str
    tier: str
    key: str
    kind: Kind
    expected_size: int
    expected_sha256: str
    actual_size: int | None = None
    actual_sha256: str | None = None
    error: str | None = None

    def report(self) -> dict[str, Any]:
        found = asdict(self)
        del found["instance_fk"]
        return {k: v for k, v in found.items() if v is not None}


def _verify(storage: StorageRegistry, row: dict[str, Any]) -> Finding:
    """Blocking: stat and re-hash one object."""
    base = {
        "instance_fk": row["instance_fk"],
        "sop_instance_uid": row["sop_instance_uid"],
        "tier": row["tier"],
        "key": row["key"],
        "expected_size": row["size"],
        "expected_sha256": row["sha256"],
    }
    if row["tier"] not in storage:
        return Finding(**base, kind="unknown_tier", error=f"tier {row['tier']!r} is not configured here")
    backend = storage.get(row["tier"])
    try:
        info = backend.stat(row["key"])
        if info is None:
            return Finding(**base, kind="missing")
        digest = sha256_of(backend, row["key"])
    except ObjectArchivedError:
        return Finding(**base, kind="archived")
    except ObjectNotFoundError:
        return Finding(**base, kind="missing")
    except (StorageError, OSError) as exc:
        return Finding(**base, kind="error", error=str(exc))
    ok = info.size == row["size"] and digest == row["sha256"]
    return Finding(**base, kind="ok" if ok else "mismatch", actual_size=info.size, actual_sha256=digest)


def _verify_batch(storage: StorageRegistry, rows: Sequence[dict[str, Any]]) -> list[Finding]:
    return [_verify(storage, row) for row in rows]


async def _unchanged(pool: asyncpg.Pool, finding: Finding) -> bool:
    """Whether the index still points where the finding looked."""
    row = await pool.fetchrow(_CURRENT, finding.instance_fk)
    return row is not None and (row["tier"], row["key"], row["sha256"]) == (
        finding.tier,
        finding.key,
        finding.expected_sha256,
    )


async def run_integrity(ctx: RunContext) -> RunResult:
    params = IntegrityParams.model_validate(ctx.task.params)
    cursor = int(ctx.state.get(CURSOR, 0))
    counts = dict.fromkeys(("ok", "missing", "mismatch", "archived", "error", "unknown_tier"), 0)
    summary: dict[str, Any] = {
        "started_at_cursor": cursor,
        "checked": 0,
        "counts": counts,
        "cycle_complete": False,
        "problems": [],
        # Archived objects cannot be read before a restore: not checked, not failures.
        "skipped": [],
    }
    completed = True
    while summary["checked"] < params.max_objects_per_run:
        if ctx.should_stop():
            completed = False
            break
        limit = min(params.batch_size, params.max_objects_per_run - summary["checked"])
        rows = [dict(r) for r in await ctx.pool.fetch(_BATCH, cursor, limit)]
        if not rows:
            cursor = 0
            summary["cycle_complete"] = True
            break
        findings = await asyncio.to_thread(_verify_batch, ctx.storage, rows)
        for finding in findings:
            await _count(ctx, params, summary, finding)
        summary["checked"] += len(rows)
        cursor = int(rows[-1]["instance_fk"])
        await ctx.save_state({**ctx.state, CURSOR: cursor})
    summary["cursor"] = cursor
    await ctx.save_state({**ctx.state, CURSOR: cursor})
    for kind in _PROBLEMS:
        ctx.metrics.integrity_last_run_problems.labels(kind=kind).set(counts[kind])
    problems = counts["missing"] + counts["mismatch"]
    if problems:
        await _alert(ctx, summary, problems)
    return RunResult(summary, completed=completed)


async def _count(ctx: RunContext, params: IntegrityParams, summary: dict[str, Any], finding: Finding) -> None:
    counts: dict[str, int] = summary["counts"]
    if finding.kind != "unknown_tier":
        ctx.metrics.integrity_checked.labels(tier=finding.tier).inc()
    if finding.kind in _PROBLEMS and not await _unchanged(ctx.pool, finding):
        counts["ok"] += 1  # moved or deleted while we looked: nothing wrong with it
        return
    counts[finding.kind] += 1
    if finding.kind == "ok":
        return
    if finding.kind in _PROBLEMS:
        ctx.metrics.integrity_mismatches.labels(tier=finding.tier, kind=finding.kind).inc()
        logger.error(
            "integrity: stored object %s (%s)",
            "missing" if finding.kind == "missing" else "does not match the index",
            finding.key,
            extra={"task": ctx.task.name, **finding.report()},
        )
    elif finding.kind in ("error", "unknown_tier"):
        logger.warning("integrity: object not checked: %s", finding.error, extra=finding.report())
    listing = summary["skipped"] if finding.kind == "archived" else summary["problems"]
    if len(listing) < params.max_reported:
        listing.append(finding.report())


async def _alert(ctx: RunContext, summary: dict[str, Any], problems: int) -> None:
    listed = [p for p in summary["problems"] if p["kind"] in _PROBLEMS]
    await ctx.audit.record(
        AuditEventId.SECURITY_ALERT,
        AuditAction.EXECUTE,
        AuditOutcome.SERIOUS_FAILURE,
        actor=task_actor(ctx.task),
        objects=[AuditObject(type="instance", id=p["sop_instance_uid"]) for p in listed[:100]],
        details={
            "task": ctx.task.name,
            "alert": "stored objects missing or not matching the index",
            "missing": summary["counts"]["missing"],
            "mismatch": summary["counts"]["mismatch"],
            "problems": problems,
        },
    )
