"""Tier migration against real storage: hot = a directory, warm = S3
STANDARD_IA (moto server), cold = Azure Archive (Azurite); the index in the
real PostgreSQL.  Full hops with the index switched, sha256 verified and
sources deleted; a crash at each step and the rerun that finishes it; two
replicas at once; jobs."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.mover import MoveStep, digest_key
from hsm_migrator.moves import Move
from hsm_migrator.runner import Runner
from hsm_migrator.service import HsmService
from pacs_common import locks
from pacs_common.hsm.jobs import MigrationJobParams, create_migration_job, recent_runs
from pacs_common.hsm.policy import Selection
from pacs_common.hsm.settings import HsmSettings, MigrationRule
from pacs_common.hsm.testing import SeededInstance, build_test_tiers, consistency_problems, seed_instances
from pacs_common.jobs import JobRepository, JobState
from pacs_common.storage import ObjectArchivedError, StorageRegistry
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer

HOT_TO_WARM = Selection(to_tier="warm", from_tiers=("hot",))
WARM_TO_COLD = Selection(to_tier="cold", from_tiers=("warm",))


class SimulatedCrashError(BaseException):
    """Stands for the process dying at a step (not an error a migrator handles)."""


@pytest.fixture
def tiers(tmp_path: Path, moto_server: MotoServer, azurite: AzuriteServer) -> Iterator[StorageRegistry]:
    registry = build_test_tiers(
        tmp_path / "hot", s3_endpoint=moto_server.url, azure_connection_string=azurite.connection_string
    )
    try:
        yield registry
    finally:
        registry.close()


def _settings(**overrides: object) -> HsmSettings:
    values: dict[str, object] = {
        "batch_size": 4,
        "concurrency": 3,
        "lease_seconds": 30.0,
        "interval_seconds": 3600.0,
        "job_poll_seconds": 0.1,
        "restores_enabled": False,
    }
    values.update(overrides)
    return HsmSettings.model_validate(values)


def _runner(pool: asyncpg.Pool, tiers: StorageRegistry, owner: str, **kwargs: object) -> Runner:
    settings = kwargs.pop("settings", None) or _settings()
    assert isinstance(settings, HsmSettings)
    return Runner(pool, tiers, settings, owner=owner, **kwargs)  # type: ignore[arg-type]


async def _locations(pool: asyncpg.Pool) -> dict[int, asyncpg.Record]:
    rows = await pool.fetch("SELECT instance_fk, tier, backend, key, size, sha256 FROM instance_location")
    return {int(row["instance_fk"]): row for row in rows}


async def _availability(pool: asyncpg.Pool, study_uid: str) -> set[str]:
    rows = await pool.fetch(
        """
        SELECT st.availability AS study, se.availability AS series, i.availability AS instance
        FROM study st JOIN series se ON se.study_fk = st.pk JOIN instance i ON i.series_fk = se.pk
        WHERE st.study_instance_uid = $1
        """,
        study_uid,
    )
    return {value for row in rows for value in row.values()}


async def _done_moves(pool: asyncpg.Pool) -> dict[tuple[int, str, str], int]:
    rows = await pool.fetch(
        """
        SELECT instance_fk, source_tier, target_tier, count(*) AS moves FROM hsm_move
        WHERE state = 'done' GROUP BY 1, 2, 3
        """
    )
    return {(int(r["instance_fk"]), r["source_tier"], r["target_tier"]): int(r["moves"]) for r in rows}


def _keys(tiers: StorageRegistry, tier: str) -> set[str]:
    return set(tiers.get(tier).iter_keys())


async def test_hot_to_warm_to_cold(db_pool: asyncpg.Pool, tiers: StorageRegistry) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, studies=2, instances_per_series=3, pixel_bytes=20_000)
    registry = CollectorRegistry()
    runner = _runner(db_pool, tiers, "replica-1", metrics=HsmMetrics(registry))
    warm = tiers.get("warm")
    cold = tiers.get("cold")
    assert isinstance(warm, S3Storage) and isinstance(cold, AzureBlobStorage)

    result = await runner.run_pass([HOT_TO_WARM], trigger="job")
    assert (result.planned, result.moved, result.failed) == (6, 6, 0)
    assert result.moved_bytes == sum(i.size for i in seeded)
    locations = await _locations(db_pool)
    for instance in seeded:
        location = locations[instance.pk]
        assert (location["tier"], location["backend"], location["key"]) == ("warm", "s3", instance.key)
        assert (location["size"], location["sha256"]) == (instance.size, instance.sha256)
        head = warm.client.head_object(Bucket=warm.bucket, Key=instance.key)
        assert head["StorageClass"] == "STANDARD_IA"
    assert _keys(tiers, "hot") == set()
    assert _keys(tiers, "warm") == {i.key for i in seeded}
    assert await _availability(db_pool, seeded[0].study_instance_uid) == {"ONLINE"}

    result = await runner.run_pass([WARM_TO_COLD], trigger="job")
    assert (result.moved, result.failed) == (6, 0)
    locations = await _locations(db_pool)
    for instance in seeded:
        assert (locations[instance.pk]["tier"], locations[instance.pk]["backend"]) == ("cold", "azure")
        blob = cold.container.get_blob_client(instance.key).get_blob_properties()
        assert blob.blob_tier == "Archive"
        with pytest.raises(ObjectArchivedError):  # must be restored before a read
            cold.read_range(instance.key, 0, 1)
    assert _keys(tiers, "warm") == set()
    assert _keys(tiers, "cold") == {i.key for i in seeded}
    for study in {i.study_instance_uid for i in seeded}:
        assert await _availability(db_pool, study) == {"NEARLINE"}

    assert await consistency_problems(db_pool, tiers) == []
    done = await _done_moves(db_pool)
    assert len(done) == 12 and set(done.values()) == {1}
    for source, target in (("hot", "warm"), ("warm", "cold")):
        labels = {"source": source, "target": target}
        assert registry.get_sample_value("pacs_hsm_migrated_instances_total", labels) == 6.0
        assert registry.get_sample_value("pacs_hsm_migrated_bytes_total", labels) == result.moved_bytes


@pytest.mark.parametrize(
    "step", [MoveStep.AFTER_COPY, MoveStep.AFTER_VERIFY, MoveStep.AFTER_SWITCH, MoveStep.BEFORE_DELETE]
)
@pytest.mark.parametrize("hop", [HOT_TO_WARM, WARM_TO_COLD], ids=["hot-warm", "warm-cold"])
async def test_crash_at_each_step_then_rerun(
    db_pool: asyncpg.Pool, tiers: StorageRegistry, step: MoveStep, hop: Selection
) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, instances_per_series=5, pixel_bytes=4096)
    if hop is WARM_TO_COLD:
        await _runner(db_pool, tiers, "setup").run_pass([HOT_TO_WARM], trigger="job")
    source = "hot" if hop is HOT_TO_WARM else "warm"
    crashed_at: list[Move] = []

    async def crash(at: MoveStep, move: Move) -> None:
        if at is step:
            crashed_at.append(move)
            raise SimulatedCrashError(f"killed {at}")

    dying = _runner(
        db_pool, tiers, "dying", settings=_settings(lease_seconds=0.3, concurrency=2), fault=crash
    )
    with pytest.raises(BaseExceptionGroup):
        await dying.run_pass([hop], trigger="policy")
    assert crashed_at
    states = {
        r["state"] for r in await db_pool.fetch("SELECT state FROM hsm_move WHERE lease_owner = 'dying'")
    }
    assert states
    # Whatever was interrupted, the index names an object that exists and is valid.
    locations = await _locations(db_pool)
    for instance in seeded:
        location = locations[instance.pk]
        assert tiers.get(location["tier"]).stat(location["key"]) is not None

    await asyncio.sleep(0.4)  # the dead migrator's leases expire
    rerun = await _runner(db_pool, tiers, "rerun").run_pass([hop], trigger="policy")
    assert rerun.recovered >= len(crashed_at)
    assert rerun.failed == 0
    assert await consistency_problems(db_pool, tiers) == []
    locations = await _locations(db_pool)
    assert {locations[i.pk]["tier"] for i in seeded} == {hop.to_tier}
    assert _keys(tiers, source) == set()
    assert _keys(tiers, hop.to_tier) == {i.key for i in seeded}
    done = await _done_moves(db_pool)
    assert {key: n for key, n in done.items() if key[1] == source} == {
        (i.pk, source, hop.to_tier): 1 for i in seeded
    }


async def test_destination_key_taken_or_left_by_an_earlier_attempt(
    db_pool: asyncpg.Pool, tiers: StorageRegistry
) -> None:
    taken, leftover, fresh = await seed_instances(db_pool, tiers.hot, instances_per_series=3)
    warm = tiers.get("warm")
    warm.put(taken.key, io.BytesIO(b"somebody else's object"))  # write-once: never overwritten
    with tiers.hot.open(leftover.key) as stream:  # an identical copy of a crashed attempt
        warm.put(leftover.key, stream)

    result = await _runner(db_pool, tiers, "replica").run_pass([HOT_TO_WARM], trigger="job")
    assert (result.moved, result.failed) == (3, 0)
    locations = await _locations(db_pool)
    assert locations[taken.pk]["key"] == digest_key(taken.key, taken.sha256)
    assert warm.read_range(taken.key, 0, 100) == b"somebody else's object"
    assert locations[leftover.pk]["key"] == leftover.key
    assert locations[fresh.pk]["key"] == fresh.key
    problems = await consistency_problems(db_pool, tiers)
    assert problems == [f"warm:{taken.key} is a leftover copy"]  # the stranger's object, untouched


async def test_locked_study_waits_and_deleted_instance_is_abandoned(
    db_pool: asyncpg.Pool, tiers: StorageRegistry
) -> None:
    locked = await seed_instances(db_pool, tiers.hot, instances_per_series=2)
    doomed = await seed_instances(db_pool, tiers.hot)
    async with db_pool.acquire() as connection:
        lock = await locks.acquire(
            connection, locked[0].study_instance_uid, "alice", mode=locks.LockMode.SHARED, ttl_seconds=60
        )

    async def delete_meanwhile(at: MoveStep, move: Move) -> None:
        if at is MoveStep.AFTER_VERIFY and move.instance_fk == doomed[0].pk:
            await db_pool.execute("DELETE FROM instance WHERE pk = $1", move.instance_fk)
            await asyncio.to_thread(tiers.hot.delete, move.source_key)

    runner = _runner(db_pool, tiers, "replica", fault=delete_meanwhile)
    result = await runner.run_pass([HOT_TO_WARM], trigger="job")
    assert (result.moved, result.abandoned, result.failed) == (0, 1, 0)
    assert _keys(tiers, "warm") == set()  # the abandoned copy is gone
    assert {r["tier"] for r in (await _locations(db_pool)).values()} == {"hot"}

    async with db_pool.acquire() as connection:
        await locks.release(connection, locked[0].study_instance_uid, lock.id)
    result = await runner.run_pass([HOT_TO_WARM], trigger="job")
    assert result.moved == 2
    assert await consistency_problems(db_pool, tiers) == []


async def test_two_replicas_move_each_instance_once(db_pool: asyncpg.Pool, tiers: StorageRegistry) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, studies=6, instances_per_series=6, pixel_bytes=2048)
    rules = [MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=0)]
    settings = _settings(rules=rules, batch_size=3, concurrency=2)
    services = [
        HsmService(
            settings,
            db_pool,
            tiers,
            _runner(db_pool, tiers, f"replica-{n}", settings=settings),
            HsmMetrics(CollectorRegistry()),
        )
        for n in (1, 2)
    ]
    results = await asyncio.gather(*(service.policy_pass() for service in services))
    moved = [r.moved for r in results if r is not None]
    assert sum(moved) == len(seeded)
    runs = await recent_runs(db_pool)
    assert sum(run.moved for run in runs) == len(seeded)
    done = await _done_moves(db_pool)
    assert done == {(i.pk, "hot", "warm"): 1 for i in seeded}
    owners = await db_pool.fetch(
        "SELECT r.owner, count(*) FROM hsm_move m JOIN hsm_run r ON r.pk = m.run_fk GROUP BY 1"
    )
    assert sum(int(row["count"]) for row in owners) == len(seeded)
    assert await consistency_problems(db_pool, tiers) == []


async def test_jobs_run_with_progress(db_pool: asyncpg.Pool, tiers: StorageRegistry) -> None:
    first: list[SeededInstance] = await seed_instances(db_pool, tiers.hot, instances_per_series=3)
    second = await seed_instances(db_pool, tiers.hot, instances_per_series=2, study_date="20100101")
    rules = [MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=365)]
    settings = _settings(rules=rules)
    service = HsmService(
        settings,
        db_pool,
        tiers,
        _runner(db_pool, tiers, "replica", settings=settings),
        HsmMetrics(CollectorRegistry()),
    )
    jobs = JobRepository(db_pool)
    dry = await create_migration_job(db_pool, MigrationJobParams(to_tier="cold", dry_run=True))
    policy = await create_migration_job(db_pool, MigrationJobParams())
    explicit = await create_migration_job(
        db_pool,
        MigrationJobParams(
            from_tier="hot", to_tier="cold", study_instance_uids=[first[0].study_instance_uid]
        ),
    )
    bad = await create_migration_job(db_pool, MigrationJobParams(to_tier="tape"))
    assert await service.run_queued_jobs() == 4

    dry_job = await jobs.get(dry.id)
    assert dry_job is not None and dry_job.state is JobState.DONE
    assert (dry_job.progress_done, dry_job.progress_total) == (5, 5)
    policy_job = await jobs.get(policy.id)
    assert policy_job is not None and policy_job.state is JobState.DONE
    assert (policy_job.progress_done, policy_job.progress_total) == (2, 2)
    explicit_job = await jobs.get(explicit.id)
    assert explicit_job is not None and explicit_job.state is JobState.DONE
    assert (explicit_job.progress_done, explicit_job.progress_total) == (3, 3)
    bad_job = await jobs.get(bad.id)
    assert bad_job is not None and bad_job.state is JobState.FAILED
    assert bad_job.error is not None and "tape" in bad_job.error

    locations = await _locations(db_pool)
    assert {locations[i.pk]["tier"] for i in first} == {"cold"}
    assert {locations[i.pk]["tier"] for i in second} == {"warm"}
    runs = {run.job_id: run for run in await recent_runs(db_pool)}
    assert runs[dry.id].dry_run and (runs[dry.id].planned, runs[dry.id].moved) == (5, 0)
    assert runs[explicit.id].moved == 3
    assert await consistency_problems(db_pool, tiers) == []


async def test_corrupt_or_missing_source_is_not_moved(db_pool: asyncpg.Pool, tiers: StorageRegistry) -> None:
    corrupt, missing, fine = await seed_instances(db_pool, tiers.hot, instances_per_series=3)
    hot = tiers.hot
    assert isinstance(hot, FilesystemStorage)
    path = hot.path_for(corrupt.key)
    path.chmod(0o644)
    path.write_bytes(b"bit rot" + path.read_bytes()[7:])
    hot.delete(missing.key)
    registry = CollectorRegistry()
    settings = _settings(max_attempts=1)
    result = await _runner(
        db_pool, tiers, "replica", settings=settings, metrics=HsmMetrics(registry)
    ).run_pass([HOT_TO_WARM], trigger="job")
    assert (result.moved, result.failed) == (1, 2)
    locations = await _locations(db_pool)
    assert (locations[corrupt.pk]["tier"], locations[missing.pk]["tier"], locations[fine.pk]["tier"]) == (
        "hot", "hot", "warm"
    )  # fmt: skip
    assert _keys(tiers, "warm") == {fine.key}  # no copy of the bad object left behind
    states = {
        r["instance_fk"]: r["state"] for r in await db_pool.fetch("SELECT instance_fk, state FROM hsm_move")
    }
    assert states == {corrupt.pk: "failed", missing.pk: "failed", fine.pk: "done"}
    for reason in ("source-checksum", "source-missing"):
        labels = {"source": "hot", "target": "warm", "reason": reason}
        assert registry.get_sample_value("pacs_hsm_migration_failures_total", labels) == 1.0
    # Given up for the backoff: the next pass leaves them alone.
    again = await _runner(db_pool, tiers, "replica", settings=settings).run_pass([HOT_TO_WARM], trigger="job")
    assert (again.moved, again.failed) == (0, 0)


async def test_cancelled_job_stops_between_batches(db_pool: asyncpg.Pool, tiers: StorageRegistry) -> None:
    seeded = await seed_instances(db_pool, tiers.hot, instances_per_series=8)
    jobs = JobRepository(db_pool)
    job = await create_migration_job(db_pool, MigrationJobParams(to_tier="warm"))

    async def cancel_once(at: MoveStep, move: Move) -> None:
        if at is MoveStep.AFTER_COPY:
            current = await jobs.get(job.id)
            if current is not None and current.state is JobState.RUNNING:
                await jobs.cancel(job.id)

    settings = _settings(batch_size=2, concurrency=1)
    runner = _runner(db_pool, tiers, "replica", settings=settings, fault=cancel_once)
    service = HsmService(settings, db_pool, tiers, runner, HsmMetrics(CollectorRegistry()))
    assert await service.run_queued_jobs() == 1
    cancelled = await jobs.get(job.id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    moved = [r for r in (await _locations(db_pool)).values() if r["tier"] == "warm"]
    assert len(moved) == 2 < len(seeded)  # the batch in hand was finished, no more
    assert await consistency_problems(db_pool, tiers) == []
