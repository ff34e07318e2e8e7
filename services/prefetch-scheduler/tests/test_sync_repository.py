"""Sync relations in the real index: validation of filters and schedules,
claims (a due relation runs once across replicas, a manual one only when
asked, a dead replica's run is failed after its lease), the next run after a
run by schedule kind, history and conflicts recorded once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import ValidationError

from pacs_common.sync import (
    Direction,
    RelationExistsError,
    RunCounts,
    RunState,
    RunTrigger,
    ScheduleKind,
    SyncFilter,
    SyncRelationCreate,
    SyncRepository,
)


def relation(name: str, /, **values: object) -> SyncRelationCreate:
    return SyncRelationCreate.model_validate({"name": name, "remote_ae_title": "ORTHANC", **values})


def test_filter_and_schedule_validation() -> None:
    where = SyncFilter(modalities=("ct", "MR ", "CT"), study_date_from="20240101")
    assert where.modalities == ("CT", "MR")
    assert where.date_range() == "20240101-"
    assert where.admits(("CT", "SR"), "20240301", "P1")
    assert not where.admits(("US",), "20240301", "P1")
    assert not where.admits(("CT",), "20231231", "P1")
    assert SyncFilter(patient_ids=("P1",)).admits((), None, "P1")
    assert not SyncFilter(patient_ids=("P1",)).admits((), None, "P2")
    for bad in (
        {"schedule_kind": "interval"},
        {"schedule_kind": "cron"},
        {"schedule_kind": "cron", "cron_expression": "every day"},
        {"direction": "sideways"},
        {"filter": {"study_date_from": "2024-01-01"}},
        {"filter": {"colour": "red"}},
        {"name": "has space"},
    ):
        with pytest.raises(ValidationError):
            relation("bad", **bad)


async def test_manual_relation_runs_only_when_asked_and_once_across_replicas(db_pool: asyncpg.Pool) -> None:
    repo = SyncRepository(db_pool)
    added = await repo.add(relation("manual", direction="both", filter={"modalities": ["CT"]}))
    assert (added.direction, added.filter.modalities, added.next_run_at) == (Direction.BOTH, ("CT",), None)
    with pytest.raises(RelationExistsError):
        await repo.add(relation("manual"))
    assert await repo.claim(60) is None

    await repo.request_run("manual")
    claims = await asyncio.gather(*(SyncRepository(db_pool).claim(60) for _ in range(4)))
    won = [c for c in claims if c is not None]
    assert len(won) == 1
    claim = won[0]
    assert claim.trigger is RunTrigger.MANUAL
    # Asked again while it runs: it waits for the running one to end.
    await repo.request_run("manual")
    assert await repo.claim(60) is None

    await repo.finish(claim, RunState.SUCCEEDED, RunCounts(studies_compared=3, instances_pulled=7))
    [run] = await repo.history("manual")
    assert (run.state, run.studies_compared, run.instances_pulled, run.trigger) == (
        RunState.SUCCEEDED,
        3,
        7,
        RunTrigger.MANUAL,
    )
    assert run.finished_at is not None
    second = await repo.claim(60)
    assert second is not None and second.relation.name == "manual"
    assert (await repo.require("manual")).next_run_at is None  # manual: never scheduled


async def test_schedules_give_the_next_run(db_pool: asyncpg.Pool) -> None:
    repo = SyncRepository(db_pool)
    before = datetime.now(UTC)
    every = await repo.add(relation("every", schedule_kind="interval", interval_seconds=3600))
    cron = await repo.add(relation("cron", schedule_kind="cron", cron_expression="0 3 * * *"))
    await repo.add(relation("continuous", schedule_kind=ScheduleKind.CONTINUOUS))
    await repo.add(relation("off", schedule_kind="interval", interval_seconds=1, enabled=False))
    assert every.next_run_at is not None and every.next_run_at <= datetime.now(UTC)
    assert cron.next_run_at is not None and (cron.next_run_at.hour, cron.next_run_at.minute) == (3, 0)

    claimed = {}
    while (claim := await repo.claim(60)) is not None:
        claimed[claim.relation.name] = claim
    assert set(claimed) == {"every", "continuous"}  # cron not due yet, "off" disabled
    for claim in claimed.values():
        assert claim.trigger is RunTrigger.SCHEDULE
        await repo.finish(claim, RunState.SUCCEEDED, RunCounts(), continuous_pause=30)
    every_next = (await repo.require("every")).next_run_at
    continuous_next = (await repo.require("continuous")).next_run_at
    assert every_next is not None and every_next >= before + timedelta(seconds=3600)
    assert continuous_next is not None and before + timedelta(seconds=30) <= continuous_next < every_next
    assert await repo.claim(60) is None


async def test_a_dead_replicas_run_is_failed_and_the_relation_runs_again(db_pool: asyncpg.Pool) -> None:
    repo = SyncRepository(db_pool)
    await repo.add(relation("lease"))
    await repo.request_run("lease")
    dead = await repo.claim(0.05)
    assert dead is not None
    await asyncio.sleep(0.2)
    await repo.request_run("lease")
    fresh = await repo.claim(60)
    assert fresh is not None and fresh.run_id != dead.run_id
    runs = {r.id: r for r in await repo.history("lease")}
    assert runs[dead.run_id].state is RunState.FAILED
    assert "lease expired" in (runs[dead.run_id].error or "")
    # The dead replica's late finish changes nothing.
    await repo.finish(dead, RunState.SUCCEEDED, RunCounts(instances_pulled=5))
    assert (await repo.get_run(dead.run_id)).state is RunState.FAILED  # type: ignore[union-attr]


async def test_conflicts_are_recorded_once_per_superseded_object(db_pool: asyncpg.Pool) -> None:
    repo = SyncRepository(db_pool)
    await repo.add(relation("conflicts", conflict_policy="keep-local"))
    await repo.request_run("conflicts")
    claim = await repo.claim(60)
    assert claim is not None
    values = {
        "sop_instance_uid": "1.2.3",
        "study_instance_uid": "1.2",
        "local_sha256": "a" * 64,
        "remote_sha256": "b" * 64,
        "resolution": "kept-local",
        "superseded_pk": 42,
    }
    assert await repo.record_conflict(claim, **values)  # type: ignore[arg-type]
    assert not await repo.record_conflict(claim, **values)  # type: ignore[arg-type]
    [conflict] = await repo.conflicts("conflicts")
    assert (conflict.sop_instance_uid, conflict.policy, conflict.run_id) == (
        "1.2.3",
        "keep-local",
        claim.run_id,
    )
    assert await repo.remove("conflicts")
    assert await repo.conflicts("conflicts") == []
