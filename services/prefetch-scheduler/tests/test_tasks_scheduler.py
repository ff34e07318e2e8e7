"""The task scheduler against the real PostgreSQL: schedules (cron and
interval), two schedulers on one database run each due task exactly once,
and tasks survive a scheduler's stop (graceful: the run is recorded as
interrupted and resumes from its cursor) and a scheduler's death (its lease
expires, the run is recorded as interrupted, the task runs again)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomweb_api.testing import store_instances
from pacs_common.cli.main import main
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.tasks import RunStatus, RunTrigger, TaskKind, TaskRepository, TaskRun, next_run
from prefetch_scheduler.tasks.service import run_task_scheduler
from prefetch_scheduler.tasks.settings import TaskSchedulerSettings

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def cr_image(study: str, series: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "TASKS-1"
    ds.PatientName = "Tasks^Test"
    ds.Modality = "CR"
    ds.StudyDate = "20200101"
    return ds


async def store_images(pool: asyncpg.Pool, storage: FilesystemStorage, count: int) -> None:
    study, series = generate_uid(), generate_uid()
    await store_instances(pool, storage, [cr_image(study, series) for _ in range(count)], tier="hot")


def settings(runner_id: str, *, lease_seconds: float = 5.0) -> TaskSchedulerSettings:
    return TaskSchedulerSettings(poll_interval_seconds=0.05, lease_seconds=lease_seconds, runner_id=runner_id)


@contextlib.asynccontextmanager
async def scheduler(
    pool: asyncpg.Pool, storage: StorageRegistry, runner_id: str, *, lease_seconds: float = 5.0
) -> AsyncIterator[asyncio.Event]:
    """``run_task_scheduler`` running in the background until the block ends
    (or the event it yields is set)."""
    stop = asyncio.Event()
    running = asyncio.create_task(
        run_task_scheduler(
            pool,
            storage,
            CollectorRegistry(),
            stop,
            settings=settings(runner_id, lease_seconds=lease_seconds),
        )
    )
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)


async def until(condition: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def runs_of(tasks: TaskRepository, name: str) -> list[TaskRun]:
    return list(reversed(await tasks.runs(name, limit=100)))


async def make_due(pool: asyncpg.Pool, name: str) -> None:
    await pool.execute(
        "UPDATE scheduled_task SET next_run_at = now() - interval '1 second' WHERE name = $1", name
    )


@pytest.fixture
def storage(fs_storage: FilesystemStorage) -> StorageRegistry:
    return StorageRegistry({"hot": fs_storage})


def test_next_occurrence_of_cron_and_interval() -> None:
    at = datetime(2026, 12, 4, 17, 30, 5, tzinfo=UTC)
    assert next_run("0 2 * * *", None, at) == datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    assert next_run("*/15 * * * *", None, at) == datetime(2026, 12, 4, 17, 45, tzinfo=UTC)
    assert next_run("0 3 * * 1", None, at) == datetime(2026, 12, 7, 3, 0, tzinfo=UTC)  # next Monday
    # On an occurrence: the next one, never the same instant again.
    assert next_run("0 2 * * *", None, datetime(2026, 12, 5, 2, 0, tzinfo=UTC)) == datetime(
        2026, 12, 6, 2, 0, tzinfo=UTC
    )
    assert next_run(None, 90, at) == at + timedelta(seconds=90)
    with pytest.raises(ValueError, match="cron"):
        next_run("every day", None, at)
    with pytest.raises(ValueError, match="exactly one"):
        next_run("0 2 * * *", 60, at)


async def test_two_schedulers_run_each_due_task_exactly_once(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, storage: StorageRegistry
) -> None:
    await store_images(db_pool, fs_storage, 12)
    tasks = TaskRepository(db_pool)
    names = [f"verify-{i}" for i in range(5)]
    for name in names:
        await tasks.create(name, TaskKind.INTEGRITY, interval_seconds=3600, params={"batch_size": 3})
        await make_due(db_pool, name)
    await tasks.create("later", TaskKind.INTEGRITY, cron="0 2 * * *")

    async with scheduler(db_pool, storage, "replica-a"), scheduler(db_pool, storage, "replica-b"):

        async def all_ran() -> bool:
            listed = {t.name: t for t in await tasks.list()}
            return all(listed[n].last_run_status == RunStatus.SUCCEEDED for n in names)

        await until(all_ran)
        await asyncio.sleep(0.5)  # ten more polls of each replica: nothing runs again
        for name in names:
            runs = await runs_of(tasks, name)
            assert [(r.status, r.trigger) for r in runs] == [(RunStatus.SUCCEEDED, RunTrigger.SCHEDULED)]
            assert runs[0].summary["checked"] == 12
            task = await tasks.require(name)
            assert task.next_run_at is not None
            assert task.next_run_at > datetime.now(UTC) + timedelta(minutes=59)
            assert task.lease_owner is None and task.last_success_at is not None
        assert await runs_of(tasks, "later") == []

        # A manual trigger runs the task once more, on one replica, also when paused.
        await tasks.pause("verify-0")
        await tasks.trigger("verify-0")
        await until(lambda: _has_runs(tasks, "verify-0", 2, finished=True))
        await asyncio.sleep(0.3)
        runs = await runs_of(tasks, "verify-0")
        assert [(r.status, r.trigger) for r in runs] == [
            (RunStatus.SUCCEEDED, RunTrigger.SCHEDULED),
            (RunStatus.SUCCEEDED, RunTrigger.MANUAL),
        ]
        assert (await tasks.require("verify-0")).paused

    runners = {r.runner_id for name in names for r in await runs_of(tasks, name)}
    assert runners <= {"replica-a", "replica-b"}


async def _has_runs(tasks: TaskRepository, name: str, count: int, *, finished: bool) -> bool:
    runs = await runs_of(tasks, name)
    return len(runs) >= count and (not finished or all(r.status != RunStatus.RUNNING for r in runs))


async def test_a_stopped_scheduler_records_the_run_interrupted_and_the_next_one_resumes(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, storage: StorageRegistry
) -> None:
    await store_images(db_pool, fs_storage, 60)
    tasks = TaskRepository(db_pool)
    await tasks.create("verify", TaskKind.INTEGRITY, interval_seconds=7200, params={"batch_size": 1})
    await make_due(db_pool, "verify")
    nightly = await tasks.create("nightly", TaskKind.ORPHANS, cron="30 1 * * *")

    async def cursor() -> int:
        state = await db_pool.fetchval("SELECT state::text FROM scheduled_task WHERE name = 'verify'")
        return int(json.loads(state).get("cursor", 0))

    async with scheduler(db_pool, storage, "replica-a") as stop:
        await until(lambda: _cursor_moved(cursor))
        stop.set()

    first = await runs_of(tasks, "verify")
    assert [(r.status, r.runner_id) for r in first] == [(RunStatus.INTERRUPTED, "replica-a")]
    assert first[0].error == "the scheduler stopped" and first[0].finished_at is not None
    stopped_at = first[0].summary["cursor"]
    assert 0 < first[0].summary["checked"] < 60
    task = await tasks.require("verify")
    assert (task.interval_seconds, task.lease_owner, task.last_run_status) == (
        7200,
        None,
        RunStatus.INTERRUPTED,
    )
    assert await tasks.require("nightly") == nightly  # untouched: schedule kept

    async with scheduler(db_pool, storage, "replica-b"):
        await until(lambda: _has_runs(tasks, "verify", 2, finished=True))
    second = (await runs_of(tasks, "verify"))[1]
    assert (second.status, second.runner_id) == (RunStatus.SUCCEEDED, "replica-b")
    assert second.summary["started_at_cursor"] == stopped_at
    assert first[0].summary["checked"] + second.summary["checked"] == 60
    assert second.summary["cycle_complete"] is True
    after = await tasks.require("verify")
    assert after.next_run_at is not None and after.next_run_at > datetime.now(UTC) + timedelta(minutes=119)


async def _cursor_moved(cursor: Callable[[], Awaitable[int]]) -> bool:
    return await cursor() > 0


async def test_the_run_of_a_dead_scheduler_is_recorded_interrupted_and_the_task_runs_again(
    db_pool: asyncpg.Pool, storage: StorageRegistry
) -> None:
    tasks = TaskRepository(db_pool)
    await tasks.create("verify", TaskKind.INTEGRITY, interval_seconds=3600)
    await make_due(db_pool, "verify")
    # A replica claims the task and dies: nobody renews its lease.
    dead = await tasks.claim("dead-replica", lease_seconds=0.3)
    assert dead is not None and dead.task.name == "verify"
    assert await tasks.claim("other", lease_seconds=5) is None  # leased, and no longer due

    async with scheduler(db_pool, storage, "replica-b"):
        await until(lambda: _has_runs(tasks, "verify", 2, finished=True))
    runs = await runs_of(tasks, "verify")
    assert [(r.status, r.runner_id) for r in runs] == [
        (RunStatus.INTERRUPTED, "dead-replica"),
        (RunStatus.SUCCEEDED, "replica-b"),
    ]
    assert runs[0].error is not None and "lease expired" in runs[0].error


async def test_cli_trigger_waits_for_the_run(
    *,
    db_pool: asyncpg.Pool,
    fs_storage: FilesystemStorage,
    storage: StorageRegistry,
    database_settings: DatabaseSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PACS_DB_URL", database_settings.url)
    await store_images(db_pool, fs_storage, 3)
    tasks = TaskRepository(db_pool)
    await tasks.create("verify", TaskKind.INTEGRITY, cron="0 2 * * *")
    await tasks.pause("verify")
    async with scheduler(db_pool, storage, "replica-a"):
        code = await asyncio.to_thread(
            main, ["-C", str(tmp_path), "tasks", "trigger", "verify", "--wait", "--timeout", "30"]
        )
    out = capsys.readouterr().out
    assert code == 0
    assert "succeeded" in out and '"checked": 3' in out
    runs = await runs_of(tasks, "verify")
    assert [(r.status, r.trigger) for r in runs] == [(RunStatus.SUCCEEDED, RunTrigger.MANUAL)]
