"""Orphan cleanup: delete stored objects that no index row refers to.

For each tier every key is listed (``iter_keys``); a key is referenced when
``instance_location`` or ``instance_superseded`` names it, or an open move
of the hsm-migrator (``hsm_move``, source or target) does.  An unreferenced
key becomes a candidate (``orphan_candidate``, first seen now); it is
deleted only once it has been a candidate for longer than the grace period
(an instance being received is written before it is indexed) and is still
unreferenced right before the delete.  A key found referenced again stops
being a candidate; candidates whose object is gone are forgotten after a
full pass over the tier.  Each run's deletions of a tier leave one audit
event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from typing import Any, Final

import asyncpg

from pacs_common.audit import AuditAction, AuditEventId, AuditObject, AuditOutcome
from pacs_common.storage import ObjectStorage, StorageError
from pacs_common.tasks import OrphansParams
from prefetch_scheduler.tasks.context import RunContext, RunResult, task_actor

__all__ = ["run_orphans"]

logger = logging.getLogger(__name__)

_LISTED: Final = 200
_OPEN_MOVES: Final = "m.state NOT IN ('done', 'failed', 'abandoned')"


def _unreferenced_query(with_moves: bool) -> str:
    moves = (
        f"""
          AND NOT EXISTS (SELECT 1 FROM hsm_move m WHERE {_OPEN_MOVES}
                          AND ((m.source_tier = $1 AND m.source_key = k)
                               OR (m.target_tier = $1 AND m.target_key = k)))"""
        if with_moves
        else ""
    )
    return f"""
        SELECT k FROM unnest($2::text[]) AS k
        WHERE NOT EXISTS (SELECT 1 FROM instance_location l WHERE l.tier = $1 AND l.key = k)
          AND NOT EXISTS (SELECT 1 FROM instance_superseded s WHERE s.tier = $1 AND s.key = k){moves}
    """


_FORGET_REFERENCED: Final = "DELETE FROM orphan_candidate WHERE tier = $1 AND key = ANY($2::text[])"
_SEEN: Final = """
INSERT INTO orphan_candidate AS c (tier, key) SELECT $1, unnest($2::text[])
ON CONFLICT (tier, key) DO UPDATE SET last_seen_at = now()
RETURNING c.key, (c.xmax = 0) AS new, c.first_seen_at < now() - make_interval(secs => $3) AS due
"""
_FORGET_GONE: Final = "DELETE FROM orphan_candidate WHERE tier = $1 AND last_seen_at < $2"


def _take(keys: Iterator[str], count: int) -> list[str]:
    return list(itertools.islice(keys, count))


def _delete(storage: ObjectStorage, key: str) -> None:
    storage.delete(key)


class _Sweep:
    """One run over the tiers."""

    def __init__(self, ctx: RunContext, params: OrphansParams, unreferenced: str) -> None:
        self.ctx = ctx
        self.params = params
        self.unreferenced = unreferenced
        self.summary: dict[str, Any] = {
            "dry_run": params.dry_run,
            "grace_seconds": params.grace_seconds,
            "scanned": 0,
            "candidates": 0,
            "new_candidates": 0,
            "deleted": 0,
            "would_delete": 0,
            "delete_failures": 0,
            "tiers": {},
            "deleted_keys": [],
        }

    async def tier(self, name: str) -> bool:
        """Sweep one tier; False when stopped before its end."""
        storage = self.ctx.storage.get(name)
        started_at = await self.ctx.pool.fetchval("SELECT now()")
        counts = {"scanned": 0, "candidates": 0, "deleted": 0}
        self.summary["tiers"][name] = counts
        keys = storage.iter_keys()  # lazy: each batch is listed in a thread
        deleted: list[str] = []
        try:
            while True:
                if self.ctx.should_stop():
                    return False
                batch = await asyncio.to_thread(_take, keys, self.params.batch_size)
                if not batch:
                    break
                counts["scanned"] += len(batch)
                self.summary["scanned"] += len(batch)
                for key in await self._batch(name, batch):
                    if await self._delete(name, storage, key):
                        deleted.append(key)
                        counts["deleted"] += 1
            await self.ctx.pool.execute(_FORGET_GONE, name, started_at)
            return True
        finally:
            counts["candidates"] = await self.ctx.pool.fetchval(
                "SELECT count(*) FROM orphan_candidate WHERE tier = $1", name
            )
            self.summary["candidates"] += counts["candidates"]
            if deleted:
                await self._audit(name, deleted)

    async def _batch(self, tier: str, keys: list[str]) -> list[str]:
        """Record what is unreferenced; the keys due for deletion."""
        rows = await self.ctx.pool.fetch(self.unreferenced, tier, keys)
        orphaned = [r["k"] for r in rows]
        referenced = sorted(set(keys) - set(orphaned))
        if referenced:
            await self.ctx.pool.execute(_FORGET_REFERENCED, tier, referenced)
        if not orphaned:
            return []
        seen = await self.ctx.pool.fetch(_SEEN, tier, orphaned, float(self.params.grace_seconds))
        self.summary["new_candidates"] += sum(1 for r in seen if r["new"])
        return sorted(r["key"] for r in seen if r["due"] and not r["new"])

    async def _delete(self, tier: str, storage: ObjectStorage, key: str) -> bool:
        if self.summary["deleted"] >= self.params.max_deletes_per_run:
            return False
        # Referenced since the batch was looked at?  Then it is no orphan.
        if not await self.ctx.pool.fetch(self.unreferenced, tier, [key]):
            await self.ctx.pool.execute(_FORGET_REFERENCED, tier, [key])
            return False
        if self.params.dry_run:
            self.summary["would_delete"] += 1
            if len(self.summary["deleted_keys"]) < _LISTED:
                self.summary["deleted_keys"].append(f"{tier}:{key}")
            return False
        try:
            await asyncio.to_thread(_delete, storage, key)
        except (StorageError, OSError) as exc:
            self.summary["delete_failures"] += 1
            logger.error("orphan not deleted: %s", exc, extra={"tier": tier, "key": key})
            return False
        await self.ctx.pool.execute(_FORGET_REFERENCED, tier, [key])
        self.summary["deleted"] += 1
        if len(self.summary["deleted_keys"]) < _LISTED:
            self.summary["deleted_keys"].append(f"{tier}:{key}")
        self.ctx.metrics.orphans_deleted.labels(tier=tier).inc()
        logger.warning(
            "deleted an orphaned object (no index row refers to it)",
            extra={"task": self.ctx.task.name, "tier": tier, "key": key},
        )
        return True

    async def _audit(self, tier: str, keys: list[str]) -> None:
        studies = dict.fromkeys(key.split("/", 1)[0] for key in keys if "/" in key)
        await self.ctx.audit.record(
            AuditEventId.STUDY_DELETED,
            AuditAction.DELETE,
            AuditOutcome.SUCCESS,
            actor=task_actor(self.ctx.task),
            objects=[
                *(AuditObject(type="study", id=study) for study in list(studies)[:100]),
                *(AuditObject(type="other", id=f"{tier}:{key}") for key in keys[:100]),
            ],
            details={
                "task": self.ctx.task.name,
                "reason": "orphaned object (no index row refers to it)",
                "tier": tier,
                "objects": len(keys),
            },
        )


async def _has_moves(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT to_regclass('hsm_move') IS NOT NULL"))


async def run_orphans(ctx: RunContext) -> RunResult:
    params = OrphansParams.model_validate(ctx.task.params)
    tiers = params.tiers if params.tiers is not None else list(ctx.storage.names)
    unknown = [tier for tier in tiers if tier not in ctx.storage]
    if unknown:
        raise ValueError(f"tiers not configured on this scheduler: {', '.join(unknown)}")
    sweep = _Sweep(ctx, params, _unreferenced_query(await _has_moves(ctx.pool)))
    for tier in tiers:
        if not await sweep.tier(tier):
            return RunResult(sweep.summary, completed=False)
    return RunResult(sweep.summary)
