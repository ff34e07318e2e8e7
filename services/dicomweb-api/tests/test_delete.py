"""DELETE of studies, series and instances against the real index and storage.

The data arrives the way it does in production: STOW-RS through the app
(real receiver, real broker), then the ingest messages are indexed the way
the ingest worker does (parse the stored object, ``InstanceIndex``).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security import AuthenticationError, Principal, Role
from dicomweb_api.settings import DicomwebSettings
from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.messaging.models import IngestMessage
from pacs_common.messaging.topology import Topology
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import BrokerSettings, DuplicatePolicy
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage

BOUNDARY = "delete-test-boundary"
ADMIN = {"x-test-roles": "administrator"}


class _HeaderAuthenticator:
    async def authenticate(self, request: Request) -> Principal:
        roles = request.headers.get("x-test-roles")
        if roles is None:
            raise AuthenticationError("no credentials")
        return Principal(
            subject="tester", roles=frozenset(Role(r) for r in roles.split(",") if r), method="token"
        )


def instance(
    study: str, series: str, *, sop_class: str, modality: str, patient: str = "DEL-1", sop: str | None = None
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop) if sop else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient
    ds.PatientName = "Delete^Test"
    ds.Modality = modality
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


async def multipart(objects: list[bytes]) -> AsyncIterator[bytes]:
    for data in objects:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


@dataclass
class Env:
    app: FastAPI
    pool: asyncpg.Pool
    storage: FilesystemStorage
    broker_settings: BrokerSettings

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://pacs.test")

    async def ingest(self, objects: list[bytes]) -> list[IngestMessage]:
        """STOW the objects, then index them as the ingest worker would."""
        async with self.client() as client:
            response = await client.post(
                "/dicom-web/studies",
                content=multipart(objects),
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                    **ADMIN,
                },
            )
        assert response.status_code == 200, response.text
        messages = await self._take_messages()
        items = []
        for message in messages:
            with self.storage.open(message.location.key) as stream:
                parsed = parse_for_index(stream, bulk_data_threshold=1024)
            items.append(IndexItem.build(parsed, message.location, datetime.now(UTC)))
        await InstanceIndex(self.pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)
        return messages

    async def _take_messages(self) -> list[IngestMessage]:
        connection = await aio_pika.connect(self.broker_settings.url.get_secret_value())
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                Topology.from_settings(self.broker_settings).ingest_queue, passive=True
            )
            taken: list[IngestMessage] = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                taken.append(IngestMessage.model_validate_json(message.body))
            return taken
        finally:
            await connection.close()

    async def count(self, table: str) -> int:
        assert table in {"patient", "study", "series", "instance", "instance_location", "instance_metadata"}
        return int(await self.pool.fetchval(f"SELECT count(*) FROM {table}"))


@pytest.fixture
def publisher(broker_settings: BrokerSettings) -> Iterator[BlockingPublisher]:
    started = BlockingPublisher(broker_settings)
    started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest_asyncio.fixture
async def env(
    db_pool: asyncpg.Pool, tmp_path: Path, publisher: BlockingPublisher, broker_settings: BrokerSettings
) -> AsyncIterator[Env]:
    storage = FilesystemStorage(tmp_path / "hot", fsync=False)
    query = AsyncQueryClient("http://127.0.0.1:9", timeout_seconds=1.0)
    context = ApiContext(
        settings=DicomwebSettings(spool_dir=tmp_path / "spool"),
        pool=db_pool,
        query=query,
        storage=StorageRegistry({"hot": storage}),
        receiver=InstanceReceiver(storage, "hot", publisher.publish_ingest),
    )
    app = create_app(context, _HeaderAuthenticator(), CollectorRegistry())
    try:
        yield Env(app, db_pool, storage, broker_settings)
    finally:
        await query.aclose()


@dataclass
class Study:
    uid: str
    ct_series: str
    mr_series: str
    ct: list[IngestMessage]
    mr: list[IngestMessage]


async def two_series_study(env: Env) -> Study:
    """A study with a CT series of two instances and an MR series of one,
    and another patient's study beside it."""
    study, ct_series, mr_series = generate_uid(), generate_uid(), generate_uid()
    ct = [instance(study, ct_series, sop_class=CTImageStorage, modality="CT") for _ in range(2)]
    mr = [instance(study, mr_series, sop_class=MRImageStorage, modality="MR")]
    other = [
        instance(generate_uid(), generate_uid(), sop_class=CTImageStorage, modality="CT", patient="DEL-2")
    ]
    messages = {m.sop_instance_uid: m for m in await env.ingest(ct + mr + other)}
    by_series = sorted(messages.values(), key=lambda m: m.sop_instance_uid)
    return Study(
        uid=study,
        ct_series=ct_series,
        mr_series=mr_series,
        ct=[m for m in by_series if m.series_instance_uid == ct_series],
        mr=[m for m in by_series if m.series_instance_uid == mr_series],
    )


async def study_row(env: Env, study: str) -> asyncpg.Record | None:
    return await env.pool.fetchrow(
        """SELECT number_of_study_related_series, number_of_study_related_instances,
                  modalities_in_study, sop_classes_in_study, study_size_bytes
           FROM study WHERE study_instance_uid = $1""",
        study,
    )


async def test_delete_instance_keeps_aggregates_right(env: Env) -> None:
    study = await two_series_study(env)
    target = study.ct[0]
    before = await study_row(env, study.uid)
    assert before is not None and before["number_of_study_related_instances"] == 3

    url = f"/dicom-web/studies/{study.uid}/series/{study.ct_series}/instances/{target.sop_instance_uid}"
    async with env.client() as client:
        response = await client.delete(url, headers=ADMIN)
        assert response.status_code == 204, response.text
        assert (await client.delete(url, headers=ADMIN)).status_code == 404

    assert not env.storage.exists(target.location.key)
    assert env.storage.exists(study.ct[1].location.key)
    assert (
        await env.pool.fetchval(
            "SELECT count(*) FROM instance WHERE sop_instance_uid = $1", target.sop_instance_uid
        )
        == 0
    )
    series_count = await env.pool.fetchval(
        "SELECT number_of_series_related_instances FROM series WHERE series_instance_uid = $1",
        study.ct_series,
    )
    assert series_count == 1
    after = await study_row(env, study.uid)
    assert after is not None
    assert after["number_of_study_related_series"] == 2
    assert after["number_of_study_related_instances"] == 2
    assert after["modalities_in_study"] == ["CT", "MR"]
    assert after["study_size_bytes"] == before["study_size_bytes"] - target.location.size
    assert await env.count("instance_location") == await env.count("instance") == 3


async def test_deleting_the_last_instance_removes_its_series(env: Env) -> None:
    study = await two_series_study(env)
    target = study.mr[0]
    url = f"/dicom-web/studies/{study.uid}/series/{study.mr_series}/instances/{target.sop_instance_uid}"
    async with env.client() as client:
        assert (await client.delete(url, headers=ADMIN)).status_code == 204

    assert (
        await env.pool.fetchval("SELECT count(*) FROM series WHERE series_instance_uid = $1", study.mr_series)
        == 0
    )
    after = await study_row(env, study.uid)
    assert after is not None
    assert after["number_of_study_related_series"] == 1
    assert after["modalities_in_study"] == ["CT"]
    assert after["sop_classes_in_study"] == [CTImageStorage]
    assert not env.storage.exists(target.location.key)


async def test_delete_series(env: Env) -> None:
    study = await two_series_study(env)
    url = f"/dicom-web/studies/{study.uid}/series/{study.ct_series}"
    async with env.client() as client:
        assert (await client.delete(url, headers=ADMIN)).status_code == 204
        assert (await client.delete(url, headers=ADMIN)).status_code == 404

    assert all(not env.storage.exists(m.location.key) for m in study.ct)
    assert env.storage.exists(study.mr[0].location.key)
    after = await study_row(env, study.uid)
    assert after is not None
    assert after["number_of_study_related_series"] == 1
    assert after["number_of_study_related_instances"] == 1
    assert after["modalities_in_study"] == ["MR"]
    assert await env.count("instance") == 2  # the MR one and the other study's


async def test_delete_study_removes_rows_objects_and_the_emptied_patient(env: Env) -> None:
    study = await two_series_study(env)
    url = f"/dicom-web/studies/{study.uid}"
    async with env.client() as client:
        assert (await client.delete(url, headers=ADMIN)).status_code == 204
        assert (await client.delete(url, headers=ADMIN)).status_code == 404

    assert await study_row(env, study.uid) is None
    assert all(not env.storage.exists(m.location.key) for m in study.ct + study.mr)
    # The other patient's study is untouched; DEL-1 had no other study.
    assert await env.count("study") == await env.count("series") == await env.count("instance") == 1
    assert await env.count("instance_metadata") == 1
    assert await env.pool.fetchval("SELECT array_agg(patient_id) FROM patient") == ["DEL-2"]
    assert len(list(env.storage.iter_keys())) == 1


async def test_unknown_entities_are_404_and_change_nothing(env: Env) -> None:
    study = await two_series_study(env)
    async with env.client() as client:
        for url in (
            f"/dicom-web/studies/{generate_uid()}",
            f"/dicom-web/studies/{study.uid}/series/{generate_uid()}",
            f"/dicom-web/studies/{study.uid}/series/{study.ct_series}/instances/{study.mr[0].sop_instance_uid}",
        ):
            assert (await client.delete(url, headers=ADMIN)).status_code == 404, url
    assert await env.count("instance") == 4


@pytest.mark.parametrize("roles", ["viewer", "technologist", "radiologist"])
async def test_delete_needs_the_delete_permission(env: Env, roles: str) -> None:
    study = await two_series_study(env)
    async with env.client() as client:
        response = await client.delete(f"/dicom-web/studies/{study.uid}", headers={"x-test-roles": roles})
    assert response.status_code == 403
    assert await env.count("instance") == 4


async def test_delete_removes_duplicates_set_aside_too(env: Env) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = instance(study, series, sop_class=CTImageStorage, modality="CT", sop=sop)
    second = instance(study, series, sop_class=CTImageStorage, modality="CT", sop=sop, patient="DEL-1B")
    messages = await env.ingest([first, second])
    assert len({m.location.key for m in messages}) == 2
    assert await env.pool.fetchval("SELECT count(*) FROM instance_superseded") == 1

    async with env.client() as client:
        response = await client.delete(
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}", headers=ADMIN
        )
    assert response.status_code == 204
    assert list(env.storage.iter_keys()) == []
    assert await env.pool.fetchval("SELECT count(*) FROM instance_superseded") == 0
    assert await env.count("study") == await env.count("patient") == 0
