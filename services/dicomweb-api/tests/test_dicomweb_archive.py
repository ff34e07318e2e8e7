"""WADO-RS and QIDO-RS over archive tiers, against real storage servers:
the cold tier configured from ``PACS_STORAGE_*`` the way ``main`` builds it
(S3 GLACIER on the moto server, Azure Archive on Azurite).

What a client notices: an archived instance answers 503 with Retry-After
and names its restore job (never a hanging or truncated response), QIDO
shows it NEARLINE while the restore is pending and ONLINE after the
restore processor ran, and then WADO-RS returns its bytes; retrievals
record last access.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomweb_api.context import ApiContext
from dicomweb_api.testing import StoredInstance, parse_multipart, store_instances
from pacs_common.archive.access import AsyncAccessRecorder
from pacs_common.archive.metrics import RestoreMetrics
from pacs_common.archive.requests import RestoreRequester
from pacs_common.archive.restore import RestoreProcessor
from pacs_common.archive.settings import AccessSettings, RestoreSettings
from pacs_common.hsm.availability import set_availability
from pacs_common.jobs import JobKind, JobRepository, JobState
from pacs_common.settings import StorageTiersSettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.testing.storage_servers import (
    MOTO_ACCESS_KEY,
    MOTO_SECRET_KEY,
    AzuriteServer,
    MotoServer,
    unique_name,
)

RETRY_AFTER = 42
INSTANCE_AVAILABILITY = "00080056"
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def _ct(study: str, series: str) -> Dataset:
    ds = dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture(params=["s3-glacier", "azure-archive"])
def tiers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[StorageRegistry]:
    """hot (filesystem) + cold (an archive tier), from the environment."""
    monkeypatch.setenv("PACS_STORAGE_TIERS", "hot,cold")
    monkeypatch.setenv("PACS_STORAGE_HOT_PATH", str(tmp_path / "hot"))
    if request.param == "s3-glacier":
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket = unique_name()
        moto.create_bucket(bucket)
        env = {
            "BACKEND": "s3",
            "S3_ENDPOINT_URL": moto.url,
            "S3_BUCKET": bucket,
            "S3_ACCESS_KEY_ID": MOTO_ACCESS_KEY,
            "S3_SECRET_ACCESS_KEY": MOTO_SECRET_KEY,
            "S3_STORAGE_CLASS": "GLACIER",
        }
    else:
        azurite: AzuriteServer = request.getfixturevalue("azurite")
        env = {
            "BACKEND": "azure",
            "AZURE_CONNECTION_STRING": azurite.connection_string,
            "AZURE_CONTAINER": unique_name(),
            "AZURE_ACCESS_TIER": "Archive",
        }
    for name, value in env.items():
        monkeypatch.setenv(f"PACS_STORAGE_COLD_{name}", value)
    registry = StorageRegistry.from_settings(StorageTiersSettings().tiers)
    yield registry
    registry.close()


@pytest.fixture
def hot_storage(tiers: StorageRegistry) -> ObjectStorage:
    return tiers.hot


@pytest.fixture
def storage_registry(tiers: StorageRegistry) -> StorageRegistry:
    return tiers


@pytest.fixture
def restore_metrics() -> CollectorRegistry:
    return CollectorRegistry()


@pytest_asyncio.fixture(loop_scope="session")
async def access(db_pool: asyncpg.Pool) -> AsyncIterator[AsyncAccessRecorder]:
    recorder = AsyncAccessRecorder(db_pool, AccessSettings(flush_interval_seconds=0.05))
    recorder.start()
    yield recorder
    await recorder.aclose()


@pytest.fixture
def api_context(
    api_context: ApiContext, access: AsyncAccessRecorder, restore_metrics: CollectorRegistry
) -> ApiContext:
    """The shared fixture's context with what ``main`` adds for archives."""
    return dataclasses.replace(
        api_context,
        access=access,
        restores=RestoreRequester(
            api_context.pool, requested_by="dicomweb-api", metrics=RestoreMetrics(restore_metrics)
        ),
        retry_after_seconds=RETRY_AFTER,
    )


def _instance_url(stored: StoredInstance, suffix: str = "") -> str:
    return (
        f"/dicom-web/studies/{stored.study_instance_uid}/series/{stored.series_instance_uid}"
        f"/instances/{stored.sop_instance_uid}{suffix}"
    )


async def _qido_availability(client: httpx.AsyncClient, stored: StoredInstance) -> tuple[str, str, str]:
    """InstanceAvailability at instance, series and study level."""
    fields = {"includefield": INSTANCE_AVAILABILITY}
    study, series, sop = stored.study_instance_uid, stored.series_instance_uid, stored.sop_instance_uid
    answers = await asyncio.gather(
        client.get(f"/dicom-web/studies/{study}/series/{series}/instances", params={**fields, "SOPInstanceUID": sop}),
        client.get(f"/dicom-web/studies/{study}/series", params={**fields, "SeriesInstanceUID": series}),
        client.get("/dicom-web/studies", params={**fields, "StudyInstanceUID": study}),
    )  # fmt: skip
    values = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        [match] = answer.json()
        values.append(match[INSTANCE_AVAILABILITY]["Value"][0])
    return values[0], values[1], values[2]


async def _restore_jobs(pool: asyncpg.Pool) -> list[tuple[int, str, str]]:
    _, jobs = await JobRepository(pool).list(kinds=frozenset({JobKind.RESTORE}))
    return [(job.id, job.state, job.params["sop_instance_uid"]) for job in jobs]


def _assert_restoring(response: httpx.Response, uids: list[str], jobs: list[tuple[int, str, str]]) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(RETRY_AFTER)
    detail = response.json()["detail"]
    assert detail["availability"] == "NEARLINE"
    job_of = {uid: job_id for job_id, _, uid in jobs}
    assert {(i["SOPInstanceUID"], i["restoreJobId"]) for i in detail["instances"]} == {
        (uid, job_of[uid]) for uid in uids
    }


async def test_archived_instance_is_503_nearline_until_restored(
    client: httpx.AsyncClient,
    db_pool: asyncpg.Pool,
    tiers: StorageRegistry,
    restore_metrics: CollectorRegistry,
) -> None:
    study, series = generate_uid(), generate_uid()
    [hot] = await store_instances(db_pool, tiers.hot, [_ct(study, series)], tier="hot")
    [cold] = await store_instances(db_pool, tiers.get("cold"), [_ct(study, series)], tier="cold")
    assert await _qido_availability(client, cold) == ("ONLINE", "ONLINE", "ONLINE")

    # The index says ONLINE, the object is archived: found before any byte is sent.
    first = await client.get(_instance_url(cold))
    jobs = await _restore_jobs(db_pool)
    assert [(state, uid) for _, state, uid in jobs] == [(JobState.QUEUED, cold.sop_instance_uid)]
    _assert_restoring(first, [cold.sop_instance_uid], jobs)
    assert restore_metrics.get_sample_value("pacs_restore_requests_total", {"tier": "cold"}) == 1
    # Frames of another archived instance: found when its pixels are read.
    [framed] = await store_instances(db_pool, tiers.get("cold"), [_ct(study, generate_uid())], tier="cold")
    response = await client.get(_instance_url(framed, "/frames/1"), headers={"Accept": FRAMES_ACCEPT})
    _assert_restoring(response, [framed.sop_instance_uid], await _restore_jobs(db_pool))
    assert (await _qido_availability(client, framed))[0] == "NEARLINE"
    await db_pool.execute("DELETE FROM job WHERE params->>'sop_instance_uid' = $1", framed.sop_instance_uid)
    await db_pool.execute("DELETE FROM instance WHERE sop_instance_uid = $1", framed.sop_instance_uid)

    # While the restore is pending: NEARLINE in QIDO, 503 (the same job) for every read of it.
    assert await _qido_availability(client, cold) == ("NEARLINE", "NEARLINE", "NEARLINE")
    assert (await _qido_availability(client, hot))[0] == "ONLINE"
    for url in (
        f"/dicom-web/studies/{study}",
        f"/dicom-web/studies/{study}/series/{series}",
        _instance_url(cold),
        _instance_url(cold, "/rendered"),
    ):
        _assert_restoring(await client.get(url), [cold.sop_instance_uid], jobs)
    _assert_restoring(
        await client.get(_instance_url(cold, "/frames/1"), headers={"Accept": FRAMES_ACCEPT}),
        [cold.sop_instance_uid],
        jobs,
    )
    assert await _restore_jobs(db_pool) == jobs
    assert restore_metrics.get_sample_value("pacs_restore_requests_total", {"tier": "cold"}) == 2
    # The instance that is online is served meanwhile.
    assert (await client.get(_instance_url(hot))).status_code == 200

    processor = RestoreProcessor(db_pool, tiers, RestoreSettings(check_interval_seconds=0))
    assert await processor.run_once() == 1

    assert await _qido_availability(client, cold) == ("ONLINE", "ONLINE", "ONLINE")
    assert [state for _, state, _ in await _restore_jobs(db_pool)] == [JobState.DONE]
    instance = await client.get(_instance_url(cold))
    assert instance.status_code == 200
    [part] = parse_multipart(instance.headers["content-type"], instance.content)
    assert part.content == cold.data
    whole = await client.get(f"/dicom-web/studies/{study}")
    assert whole.status_code == 200
    parts = parse_multipart(whole.headers["content-type"], whole.content)
    assert sorted(p.content for p in parts) == sorted([hot.data, cold.data])
    frames = await client.get(_instance_url(cold, "/frames/1"), headers={"Accept": FRAMES_ACCEPT})
    assert frames.status_code == 200


async def test_instance_the_index_lists_nearline_is_503_at_once(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, tiers: StorageRegistry
) -> None:
    """As the hsm-migrator leaves an instance it moved to an archive tier."""
    study, series = generate_uid(), generate_uid()
    stored = await store_instances(db_pool, tiers.hot, [_ct(study, series), _ct(study, series)], tier="hot")
    pks = await db_pool.fetch(
        "SELECT pk FROM instance WHERE sop_instance_uid = $1", stored[1].sop_instance_uid
    )
    async with db_pool.acquire() as connection:
        await set_availability(connection, [pks[0]["pk"]], "NEARLINE")

    response = await client.get(f"/dicom-web/studies/{study}")
    jobs = await _restore_jobs(db_pool)
    _assert_restoring(response, [stored[1].sop_instance_uid], jobs)
    bulk = await client.get(_instance_url(stored[1], "/bulkdata/7FE00010"))
    _assert_restoring(bulk, [stored[1].sop_instance_uid], jobs)

    # Readable after all (a restored copy): the processor puts it back online.
    assert await RestoreProcessor(db_pool, tiers, RestoreSettings(check_interval_seconds=0)).run_once() == 1
    assert (await client.get(f"/dicom-web/studies/{study}")).status_code == 200


async def _last_accessed(
    pool: asyncpg.Pool, sop_instance_uid: str
) -> tuple[datetime | None, datetime | None]:
    row = await pool.fetchrow(
        """
        SELECT i.last_accessed_at AS instance, st.last_accessed_at AS study
        FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
        WHERE i.sop_instance_uid = $1
        """,
        sop_instance_uid,
    )
    assert row is not None
    return row["instance"], row["study"]


@pytest.mark.parametrize("tiers", ["s3-glacier"], indirect=True)
async def test_wado_retrievals_record_last_access(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, tiers: StorageRegistry
) -> None:
    study, series = generate_uid(), generate_uid()
    retrieved, framed, untouched = await store_instances(
        db_pool, tiers.hot, [_ct(study, series) for _ in range(3)], tier="hot"
    )
    assert (await client.get(_instance_url(retrieved))).status_code == 200
    for _ in range(20):  # a viewer scrolling: one write at the next flush, not one per frame
        response = await client.get(_instance_url(framed, "/frames/1"), headers={"Accept": FRAMES_ACCEPT})
        assert response.status_code == 200
    for _ in range(100):
        if None not in await _last_accessed(db_pool, framed.sop_instance_uid):
            break
        await asyncio.sleep(0.05)
    instance_at, study_at = await _last_accessed(db_pool, retrieved.sop_instance_uid)
    assert instance_at is not None and study_at is not None
    assert (await _last_accessed(db_pool, framed.sop_instance_uid))[0] is not None
    assert (await _last_accessed(db_pool, untouched.sop_instance_uid))[0] is None
