"""Restore requests and the restore processor against real PostgreSQL, the
moto S3 server (GLACIER objects) and Azurite (Archive blobs)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.archive.requests import request_restores
from pacs_common.archive.restore import RestoreProcessor
from pacs_common.archive.settings import RestoreSettings
from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.jobs import JobKind, JobRepository, JobState
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DuplicatePolicy
from pacs_common.storage import ObjectArchivedError, ObjectStorage, StorageRegistry
from pacs_common.storage.azure import AzureBlobStorage
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.storage_servers import AzuriteServer, MotoServer, unique_name

CT = Path(str(get_testdata_file("CT_small.dcm", download=False)))
FAST = RestoreSettings(check_interval_seconds=0, timeout_seconds=3600)


def _object(study: str, series: str) -> tuple[str, bytes]:
    ds = dcmread(CT)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buffer.getvalue()


async def _store(
    pool: asyncpg.Pool, storage: ObjectStorage, tier: str, study: str, count: int = 1
) -> list[str]:
    series = generate_uid()
    uids, items = [], []
    for _ in range(count):
        uid, data = _object(study, series)
        key = f"{study}/{series}/{uid}.dcm"
        await asyncio.to_thread(storage.put, key, io.BytesIO(data))
        location = StorageLocation(
            tier=tier, backend=storage.kind, key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=1024)
        items.append(IndexItem.build(parsed, location, datetime.now(UTC)))
        uids.append(uid)
    await InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
    return uids


async def _availability(pool: asyncpg.Pool, uid: str) -> tuple[str, str, str]:
    row = await pool.fetchrow(
        """
        SELECT i.availability AS i, se.availability AS se, st.availability AS st
        FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
        WHERE i.sop_instance_uid = $1
        """,
        uid,
    )
    assert row is not None
    return row["i"], row["se"], row["st"]


async def _restore_jobs(pool: asyncpg.Pool) -> list[tuple[int, str, dict[str, str]]]:
    _, jobs = await JobRepository(pool).list(kinds=frozenset({JobKind.RESTORE}))
    return [(job.id, job.state, job.params) for job in jobs]


@pytest.fixture
def glacier(moto_server: MotoServer, s3_storage: S3Storage) -> Iterator[S3Storage]:
    storage = S3Storage(s3_storage.bucket, client=moto_server.client(), storage_class="GLACIER")
    yield storage
    storage.close()


@pytest.fixture
def archive_blobs(azurite: AzuriteServer) -> Iterator[AzureBlobStorage]:
    storage = AzureBlobStorage.from_connection_string(
        azurite.connection_string, unique_name(), access_tier="Archive"
    )
    yield storage
    storage.container.delete_container()
    storage.close()


@pytest.mark.parametrize("backend", ["s3", "azure"])
async def test_archived_instance_is_requested_once_and_restored_online(
    backend: str,
    request: pytest.FixtureRequest,
    db_pool: asyncpg.Pool,
    fs_storage: FilesystemStorage,
) -> None:
    cold: ObjectStorage = request.getfixturevalue("glacier" if backend == "s3" else "archive_blobs")
    study = generate_uid()
    online = await _store(db_pool, fs_storage, "hot", study)
    [archived] = await _store(db_pool, cold, "cold", study)
    key = (await db_pool.fetchval(
        "SELECT l.key FROM instance_location l JOIN instance i ON i.pk = l.instance_fk WHERE i.sop_instance_uid = $1",
        archived,
    ))  # fmt: skip
    with pytest.raises(ObjectArchivedError):
        await asyncio.to_thread(cold.read_range, key, 0, 10)
    registry = CollectorRegistry()
    metrics = RestoreMetrics(registry)

    [ticket] = await request_restores(
        db_pool, [archived, "1.2.3.unknown"], requested_by="test", metrics=metrics
    )
    again = await asyncio.gather(*(request_restores(db_pool, [archived], metrics=metrics) for _ in range(4)))

    assert ticket.created and ticket.tier == "cold" and ticket.study_instance_uid == study
    assert all(t.job_id == ticket.job_id and not t.created for [t] in again)
    [(job_id, state, params)] = await _restore_jobs(db_pool)
    assert (job_id, state) == (ticket.job_id, JobState.QUEUED)
    assert params["sop_instance_uid"] == archived and params["tier"] == "cold" and params["key"] == key
    assert registry.get_sample_value("pacs_restore_requests_total", {"tier": "cold"}) == 1
    assert await _availability(db_pool, archived) == ("NEARLINE", "NEARLINE", "NEARLINE")
    assert (await _availability(db_pool, online[0]))[0] == "ONLINE"

    processor_registry = CollectorRegistry()
    processor = RestoreProcessor(
        db_pool, StorageRegistry({"hot": fs_storage, "cold": cold}), FAST, registry=processor_registry
    )
    assert await processor.run_once() == 1
    assert await processor.run_once() == 0

    assert await _availability(db_pool, archived) == ("ONLINE", "ONLINE", "ONLINE")
    [(_, state, params)] = await _restore_jobs(db_pool)
    assert state == JobState.DONE
    assert params["restore_requested_key"] == f"cold/{key}"
    assert (await asyncio.to_thread(cold.read_range, key, 0, 4)) != b""
    assert processor_registry.get_sample_value("pacs_restore_completed_total", {"tier": "cold"}) == 1
    # A new request after completion starts a new job.
    [later] = await request_restores(db_pool, [archived])
    assert later.created and later.job_id != job_id


async def test_missing_object_or_tier_fails_the_restore(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, glacier: S3Storage
) -> None:
    study = generate_uid()
    [gone] = await _store(db_pool, glacier, "cold", study)
    [elsewhere] = await _store(db_pool, glacier, "warm", study)
    for key in list(glacier.iter_keys()):
        if gone in key:
            glacier.delete(key)
    await request_restores(db_pool, [gone, elsewhere])
    registry = CollectorRegistry()
    processor = RestoreProcessor(
        db_pool, StorageRegistry({"hot": fs_storage, "cold": glacier}), FAST, registry=registry
    )
    assert await processor.run_once() == 2
    _, jobs = await JobRepository(db_pool).list(kinds=frozenset({JobKind.RESTORE}))
    errors = {job.params["sop_instance_uid"]: job.error for job in jobs if job.state == JobState.FAILED}
    assert "missing" in (errors[gone] or "")
    assert "not configured" in (errors[elsewhere] or "")
    assert registry.get_sample_value("pacs_restore_failed_total", {"tier": "cold"}) == 1
    assert registry.get_sample_value("pacs_restore_failed_total", {"tier": "warm"}) == 1


async def test_replicas_share_the_restore_jobs(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, glacier: S3Storage
) -> None:
    uids = await _store(db_pool, glacier, "cold", generate_uid(), count=6)
    tickets = await request_restores(db_pool, uids)
    assert len({t.job_id for t in tickets}) == 6
    tiers = StorageRegistry({"hot": fs_storage, "cold": glacier})
    processors = [RestoreProcessor(db_pool, tiers, FAST) for _ in range(3)]
    progressed = await asyncio.gather(*(p.run_once() for p in processors))
    assert sum(progressed) == 6
    states = [state for _, state, _ in await _restore_jobs(db_pool)]
    assert states == [JobState.DONE] * 6


async def test_a_restore_finished_meanwhile_is_not_asked_for_again(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage, glacier: S3Storage
) -> None:
    """A reader that saw NEARLINE in a query answered before the restore
    finished does not queue a second restore; one that found the object
    archived in storage does."""
    [uid] = await _store(db_pool, glacier, "cold", generate_uid())
    await request_restores(db_pool, [uid])
    processor = RestoreProcessor(db_pool, StorageRegistry({"hot": fs_storage, "cold": glacier}), FAST)
    assert await processor.run_once() == 1

    assert await request_restores(db_pool, [uid], found_archived=False) == []
    assert [state for _, state, _ in await _restore_jobs(db_pool)] == [JobState.DONE]
    [again] = await request_restores(db_pool, [uid], found_archived=True)
    assert again.created
    assert await _availability(db_pool, uid) == ("NEARLINE", "NEARLINE", "NEARLINE")
