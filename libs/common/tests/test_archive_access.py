"""Last-access recording against the real PostgreSQL: coalesced in memory,
written by background flushes, never moved backwards, flushed on stop."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pacs_common.archive.access import AccessBatch, AsyncAccessRecorder, ThreadedAccessRecorder, write_access
from pacs_common.archive.settings import AccessSettings
from pacs_common.db.blocking import BlockingPool
from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DatabaseSettings, DuplicatePolicy

CT = Path(str(get_testdata_file("CT_small.dcm", download=False)))


async def _index(pool: asyncpg.Pool, study: str, count: int) -> list[str]:
    series = generate_uid()
    items, uids = [], []
    for _ in range(count):
        ds = dcmread(CT)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        location = StorageLocation(
            tier="hot", backend="filesystem", key=f"{ds.SOPInstanceUID}.dcm", size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )  # fmt: skip
        items.append(
            IndexItem.build(
                parse_for_index(io.BytesIO(data), bulk_data_threshold=1024), location, datetime.now(UTC)
            )
        )
        uids.append(str(ds.SOPInstanceUID))
    await InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
    return uids


async def _accessed(pool: asyncpg.Pool, study: str) -> tuple[datetime | None, dict[str, datetime | None]]:
    at = await pool.fetchval("SELECT last_accessed_at FROM study WHERE study_instance_uid = $1", study)
    rows = await pool.fetch(
        """
        SELECT i.sop_instance_uid, i.last_accessed_at FROM instance i
        JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
        WHERE st.study_instance_uid = $1
        """,
        study,
    )
    return at, {r["sop_instance_uid"]: r["last_accessed_at"] for r in rows}


async def test_async_recorder_coalesces_and_flushes_in_the_background(db_pool: asyncpg.Pool) -> None:
    study = generate_uid()
    uids = await _index(db_pool, study, 3)
    recorder = AsyncAccessRecorder(db_pool, AccessSettings(flush_interval_seconds=0.05))
    recorder.start()
    before = datetime.now(UTC)
    for _ in range(100):  # a viewer reading frame after frame
        recorder.record(study, uids[:2])
    for _ in range(100):
        study_at, instances = await _accessed(db_pool, study)
        if study_at is not None:
            break
        await asyncio.sleep(0.05)
    assert study_at is not None and study_at >= before - timedelta(seconds=1)
    assert instances[uids[0]] is not None and instances[uids[1]] is not None
    assert instances[uids[2]] is None
    recorder.record(study, [uids[2]])
    await recorder.aclose()  # the last accesses are written on close
    _, instances = await _accessed(db_pool, study)
    assert instances[uids[2]] is not None


async def test_an_older_access_never_moves_last_access_back(db_pool: asyncpg.Pool) -> None:
    study = generate_uid()
    [uid] = await _index(db_pool, study, 1)
    now = datetime.now(UTC)
    await write_access(db_pool, AccessBatch({uid: now}, {study: now}))
    await write_access(db_pool, AccessBatch({uid: now - timedelta(days=3)}, {study: now - timedelta(days=3)}))
    study_at, instances = await _accessed(db_pool, study)
    assert study_at == now and instances[uid] == now


@pytest.fixture
def blocking_pool(database_settings: DatabaseSettings) -> Iterator[BlockingPool]:
    pool = BlockingPool(database_settings, application_name="access-tests")
    pool.start()
    yield pool
    pool.stop()


async def test_threaded_recorder_from_many_threads_flushes_on_stop(
    db_pool: asyncpg.Pool, blocking_pool: BlockingPool
) -> None:
    study = generate_uid()
    uids = await _index(db_pool, study, 4)
    recorder = ThreadedAccessRecorder(blocking_pool, AccessSettings(flush_interval_seconds=60))
    recorder.start()

    def reader(uid: str) -> None:
        for _ in range(50):
            recorder.record(study, [uid])

    await asyncio.gather(*(asyncio.to_thread(reader, uid) for uid in uids))
    assert (await _accessed(db_pool, study))[0] is None  # nothing written before the flush
    await asyncio.to_thread(recorder.stop)
    study_at, instances = await _accessed(db_pool, study)
    assert study_at is not None and all(at is not None for at in instances.values())
