"""The maintenance tasks on real data (indexed the way the ingest worker
indexes, objects on the filesystem and on an S3 server): retention deletes
expired studies but never protected ones and audits each deletion;
integrity finds flipped bytes and missing objects; orphan cleanup deletes
unreferenced objects only after their grace period."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomweb_api.testing import StoredInstance, part10_bytes, store_instances
from pacs_common import locks
from pacs_common.audit import AuditLog, AuditQuery, AuditSettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.storage.s3 import S3Storage
from pacs_common.tasks import RunStatus, TaskKind, TaskRepository, TaskRun, TaskUpdate
from prefetch_scheduler.tasks.metrics import TaskMetrics
from prefetch_scheduler.tasks.scheduler import TaskScheduler
from prefetch_scheduler.tasks.settings import TaskSchedulerSettings

CR = UID("1.2.840.10008.5.1.4.1.1.1")
MR = UID("1.2.840.10008.5.1.4.1.1.4")
RUNNER = "test-runner"


def image(
    study: str, *, modality: str = "CR", study_date: str | None = "20100101", patient: str = "P1"
) -> Dataset:
    sop_class = MR if modality == "MR" else CR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.PatientName = "Retention^Test"
    ds.Modality = modality
    if study_date is not None:
        ds.StudyDate = study_date
    return ds


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest) -> ObjectStorage:
    storage: ObjectStorage = request.getfixturevalue(
        "fs_storage" if request.param == "filesystem" else "s3_storage"
    )
    return storage


class Harness:
    """Runs tasks the way a scheduler replica does (claim, execute, record)."""

    def __init__(self, pool: asyncpg.Pool, storage: ObjectStorage) -> None:
        self.pool = pool
        self.backend = storage
        self.storage = StorageRegistry({"hot": storage})
        self.tasks = TaskRepository(pool)
        self.registry = CollectorRegistry()
        self.audit = AuditLog(pool, AuditSettings())
        self.scheduler = TaskScheduler(
            pool,
            self.storage,
            audit=self.audit,
            metrics=TaskMetrics(self.registry),
            settings=TaskSchedulerSettings(lease_seconds=30),
            runner_id=RUNNER,
        )

    async def store(self, *datasets: Dataset) -> list[StoredInstance]:
        return await store_instances(self.pool, self.backend, datasets, tier="hot")

    async def run(self, name: str) -> TaskRun:
        await self.tasks.trigger(name)
        claim = await self.tasks.claim(RUNNER, 30)
        assert claim is not None and claim.task.name == name
        await self.scheduler.execute(claim, asyncio.Event())
        run = await self.tasks.get_run(claim.run.id)
        assert run is not None
        assert run.status == RunStatus.SUCCEEDED, run.error
        return run

    async def study_exists(self, study: str) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM study WHERE study_instance_uid = $1)", study
            )
        )

    def exists(self, stored: StoredInstance) -> bool:
        return self.backend.exists(stored.location.key)


@pytest.fixture
def harness(db_pool: asyncpg.Pool, backend: ObjectStorage) -> Harness:
    return Harness(db_pool, backend)


@pytest.mark.parametrize("backend", ["filesystem"], indirect=True)
async def test_retention_deletes_expired_studies_but_not_recent_or_protected_ones(harness: Harness) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    old, recent, held, locked, old_mr, undated = (generate_uid() for _ in range(6))
    old_objects = await harness.store(image(old, patient="OLD-1"), image(old, patient="OLD-1"))
    kept = await harness.store(
        image(recent, study_date=today),
        image(held),
        image(locked),
        image(old_mr, modality="MR"),
        image(undated, study_date=None),  # received now: young
    )
    await harness.tasks.hold(held, reason="litigation")
    async with harness.pool.acquire() as connection:
        await locks.acquire(connection, locked, "radiologist", mode=locks.LockMode.SHARED, ttl_seconds=600)
    await harness.tasks.create(
        "retention",
        TaskKind.RETENTION,
        cron="0 4 * * *",
        params={"rules": [{"modality": "CR", "days": 365}], "dry_run": True},
    )

    dry = await harness.run("retention")
    assert (dry.summary["studies"], dry.summary["deleted_studies"]) == ([old], 0)
    assert await harness.study_exists(old) and all(harness.exists(s) for s in old_objects)

    await harness.tasks.update("retention", TaskUpdate(params={"rules": [{"modality": "CR", "days": 365}]}))
    run = await harness.run("retention")
    assert run.summary["studies"] == [old]
    assert (run.summary["deleted_studies"], run.summary["deleted_instances"], run.summary["protected"]) == (
        1,
        2,
        2,
    )
    assert set(run.summary["protected_studies"]) == {held, locked}
    assert not await harness.study_exists(old)
    assert not any(harness.exists(s) for s in old_objects)
    for study in (recent, held, locked, old_mr, undated):
        assert await harness.study_exists(study)
    assert all(harness.exists(s) for s in kept)

    events = await harness.audit.query(AuditQuery(study=old))
    assert [(e.event_name, e.action, e.actor, e.patient_id) for e in events] == [
        ("DICOM Study Deleted", "D", "prefetch-scheduler/retention", "OLD-1")
    ]
    assert events[0].details["instances"] == 2 and events[0].details["retention_days"] == 365

    # Released from hold, the study goes at the next run.
    assert await harness.tasks.unhold(held)
    again = await harness.run("retention")
    assert (again.summary["studies"], again.summary["protected_studies"]) == ([held], [locked])
    assert not await harness.study_exists(held)


async def test_retention_without_rules_deletes_nothing(harness: Harness) -> None:
    study = generate_uid()
    await harness.store(image(study, study_date="19900101"))
    await harness.tasks.create("retention", TaskKind.RETENTION, cron="0 4 * * *", params={"rules": []})
    run = await harness.run("retention")
    assert run.summary["deleted_studies"] == 0 and "no retention rules" in run.summary["note"]
    assert await harness.study_exists(study)


async def test_integrity_finds_a_flipped_byte_and_a_missing_object(harness: Harness) -> None:
    study = generate_uid()
    good, flipped, gone = await harness.store(image(study), image(study), image(study))
    data = bytearray(flipped.data)
    data[len(data) // 2] ^= 0xFF
    harness.backend.delete(flipped.location.key)
    harness.backend.put(flipped.location.key, io.BytesIO(bytes(data)), size=len(data))
    harness.backend.delete(gone.location.key)
    await harness.tasks.create("integrity", TaskKind.INTEGRITY, cron="0 2 * * *", params={"batch_size": 2})

    run = await harness.run("integrity")
    counts = run.summary["counts"]
    assert (run.summary["checked"], counts["ok"], counts["mismatch"], counts["missing"]) == (3, 1, 1, 1)
    problems = {p["sop_instance_uid"]: p for p in run.summary["problems"]}
    assert set(problems) == {flipped.sop_instance_uid, gone.sop_instance_uid}
    mismatch = problems[flipped.sop_instance_uid]
    assert (mismatch["kind"], mismatch["tier"], mismatch["key"]) == ("mismatch", "hot", flipped.location.key)
    assert mismatch["expected_sha256"] == flipped.location.sha256 != mismatch["actual_sha256"]
    assert mismatch["actual_size"] == mismatch["expected_size"]
    assert problems[gone.sop_instance_uid]["kind"] == "missing"
    assert good.sop_instance_uid not in problems
    sample = harness.registry.get_sample_value
    assert sample("pacs_integrity_mismatches_total", {"tier": "hot", "kind": "mismatch"}) == 1
    assert sample("pacs_integrity_mismatches_total", {"tier": "hot", "kind": "missing"}) == 1
    assert sample("pacs_integrity_last_run_problems", {"kind": "missing"}) == 1
    assert sample("pacs_task_runs_total", {"task": "integrity", "status": "succeeded"}) == 1
    alerts = await harness.audit.query(AuditQuery(event_id="110113"))
    assert len(alerts) == 1 and alerts[0].details["mismatch"] == 1

    # Repaired, the next full pass is clean.
    harness.backend.delete(flipped.location.key)
    harness.backend.put(flipped.location.key, io.BytesIO(flipped.data), size=len(flipped.data))
    harness.backend.put(gone.location.key, io.BytesIO(gone.data), size=len(gone.data))
    clean = await harness.run("integrity")
    assert (clean.summary["checked"], clean.summary["counts"]["ok"], clean.summary["problems"]) == (3, 3, [])
    assert sample("pacs_integrity_last_run_problems", {"kind": "mismatch"}) == 0


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
async def test_integrity_skips_archived_objects(harness: Harness) -> None:
    study = generate_uid()
    hot, archived = await harness.store(image(study), image(study))
    assert isinstance(harness.backend, S3Storage)
    name = harness.backend.prefix + archived.location.key
    harness.backend.client.copy_object(
        Bucket=harness.backend.bucket,
        Key=name,
        CopySource={"Bucket": harness.backend.bucket, "Key": name},
        StorageClass="GLACIER",
        MetadataDirective="COPY",
    )
    await harness.tasks.create("integrity", TaskKind.INTEGRITY, cron="0 2 * * *")
    run = await harness.run("integrity")
    counts = run.summary["counts"]
    assert (counts["ok"], counts["archived"], counts["missing"], counts["mismatch"]) == (1, 1, 0, 0)
    assert run.summary["problems"] == []
    assert [(s["sop_instance_uid"], s["kind"]) for s in run.summary["skipped"]] == [
        (archived.sop_instance_uid, "archived")
    ]
    assert hot.sop_instance_uid not in {s["sop_instance_uid"] for s in run.summary["skipped"]}


@pytest.mark.parametrize("backend", ["filesystem"], indirect=True)
async def test_integrity_runs_are_bounded_and_continue_where_the_last_one_stopped(harness: Harness) -> None:
    study = generate_uid()
    await harness.store(*(image(study) for _ in range(5)))
    await harness.tasks.create(
        "integrity",
        TaskKind.INTEGRITY,
        interval_seconds=60,
        params={"batch_size": 2, "max_objects_per_run": 3},
    )
    first = await harness.run("integrity")
    second = await harness.run("integrity")
    assert (first.summary["checked"], first.summary["cycle_complete"]) == (3, False)
    assert (second.summary["checked"], second.summary["cycle_complete"]) == (2, True)
    assert second.summary["started_at_cursor"] == first.summary["cursor"]
    third = await harness.run("integrity")
    assert (third.summary["started_at_cursor"], third.summary["checked"]) == (0, 3)


async def test_orphans_are_deleted_only_after_the_grace_period(harness: Harness) -> None:
    study = generate_uid()
    referenced = await harness.store(image(study), image(study))
    orphan_key = f"{study}/{generate_uid()}/{generate_uid()}.dcm"
    orphan = part10_bytes(image(study))
    harness.backend.put(orphan_key, io.BytesIO(orphan), size=len(orphan))
    await harness.tasks.create("orphans", TaskKind.ORPHANS, cron="0 3 * * *", params={"grace_seconds": 1})

    first = await harness.run("orphans")
    assert (first.summary["scanned"], first.summary["new_candidates"], first.summary["deleted"]) == (3, 1, 0)
    assert harness.backend.exists(orphan_key)

    await asyncio.sleep(1.2)  # past the grace period
    second = await harness.run("orphans")
    assert (second.summary["deleted"], second.summary["deleted_keys"]) == (1, [f"hot:{orphan_key}"])
    assert not harness.backend.exists(orphan_key)
    assert all(harness.exists(s) for s in referenced)
    assert await harness.pool.fetchval("SELECT count(*) FROM orphan_candidate") == 0
    events = await harness.audit.query(AuditQuery(study=study))
    assert len(events) == 1 and events[0].details["objects"] == 1
    assert events[0].actor == "prefetch-scheduler/orphans"

    third = await harness.run("orphans")
    assert (third.summary["scanned"], third.summary["deleted"], third.summary["new_candidates"]) == (2, 0, 0)
    assert all(harness.exists(s) for s in referenced)


@pytest.mark.parametrize("backend", ["filesystem"], indirect=True)
async def test_an_orphan_indexed_meanwhile_is_not_deleted(harness: Harness) -> None:
    study = generate_uid()
    late = image(study)
    data = part10_bytes(late)
    key = f"{study}/{late.SeriesInstanceUID}/{late.SOPInstanceUID}.dcm"
    harness.backend.put(key, io.BytesIO(data), size=len(data))  # received, not indexed yet
    await harness.tasks.create("orphans", TaskKind.ORPHANS, cron="0 3 * * *", params={"grace_seconds": 0})
    first = await harness.run("orphans")
    assert (first.summary["new_candidates"], first.summary["deleted"]) == (1, 0)
    # Now indexed (the helper writes the object again, under a key of its own
    # since this one is taken: point the index at the first one).
    await harness.store(late)
    await harness.pool.execute("UPDATE instance_location SET key = $1", key)
    await harness.pool.execute("UPDATE orphan_candidate SET first_seen_at = now() - interval '1 day'")
    second = await harness.run("orphans")
    assert second.summary["deleted"] == 0
    assert harness.backend.exists(key)
    assert await harness.pool.fetchval("SELECT count(*) FROM orphan_candidate WHERE key = $1", key) == 0
