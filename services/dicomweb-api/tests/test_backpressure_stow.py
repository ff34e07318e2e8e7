"""Backpressure at STOW-RS, against a real RabbitMQ and PostgreSQL.

The app is built the way ``dicomweb_api.main`` builds it: a
:class:`Backpressure` fed by a :class:`BacklogSampler` reading the
namespace's ingest queue, the hot tier wrapped to time its writes, and the
state handed to ``create_app``.  The ingest queue is filled past the limit by
publishing into it with no worker running; STOW-RS then answers 503 with
Retry-After and a JSON reason and stores nothing; after the queue drains the
same request is stored.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.settings import DicomwebSettings
from dicomweb_api.testing import ROLES_HEADER, HeaderAuthenticator
from pacs_common.backpressure import BacklogSampler, Backpressure, BackpressureSettings
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.messaging.queue_depth import QueueDepthProbe
from pacs_common.messaging.topology import Topology
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver
from pacs_common.settings import BrokerSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.testing.broker import sample_ingest_message

BOUNDARY = "backpressure-boundary-1c9e"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
BACKLOG_LIMIT = 5
RETRY_AFTER = 7


def _instance() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BP-1"
    ds.Modality = "CT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _body(data: bytes) -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@dataclass
class Stack:
    client: httpx.AsyncClient
    storage: FilesystemStorage
    registry: CollectorRegistry
    backpressure: Backpressure
    publisher: BlockingPublisher

    async def stow(self) -> httpx.Response:
        return await self.client.post(
            "/dicom-web/studies",
            content=_body(_instance()),
            headers={"Content-Type": CONTENT_TYPE, ROLES_HEADER: "technologist"},
        )

    def refusals(self) -> float:
        labels = {"reason": "ingest_backlog"}
        return self.registry.get_sample_value("pacs_dicomweb_backpressure_refusals_total", labels) or 0.0

    def refusing(self) -> float | None:
        return self.registry.get_sample_value("pacs_dicomweb_backpressure_refusing")


@pytest.fixture
def publisher(broker_settings: BrokerSettings) -> Iterator[BlockingPublisher]:
    started = BlockingPublisher(broker_settings)
    started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest_asyncio.fixture
async def stack(
    db_pool: asyncpg.Pool, tmp_path: Path, publisher: BlockingPublisher, broker_settings: BrokerSettings
) -> AsyncIterator[Stack]:
    backpressure = Backpressure(
        BackpressureSettings(
            max_ingest_backlog=BACKLOG_LIMIT,
            sample_interval_seconds=0.1,
            resume_fraction=0.5,
            retry_after_seconds=RETRY_AFTER,
        )
    )
    probe = QueueDepthProbe(broker_settings)
    sampler = BacklogSampler(backpressure, probe, probe.close)
    sampler.start()
    storage = FilesystemStorage(tmp_path / "hot", fsync=False)
    query = AsyncQueryClient("http://127.0.0.1:9", timeout_seconds=1.0)
    context = ApiContext(
        settings=DicomwebSettings(spool_dir=tmp_path / "spool"),
        pool=db_pool,
        query=query,
        storage=StorageRegistry({"hot": storage}),
        receiver=InstanceReceiver(backpressure.timed(storage), "hot", publisher.publish_ingest),
    )
    registry = CollectorRegistry()
    app = create_app(context, HeaderAuthenticator(), registry, backpressure=backpressure)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://pacs.test"
        ) as client:
            yield Stack(client, storage, registry, backpressure, publisher)
    finally:
        await asyncio.to_thread(sampler.stop)
        await query.aclose()


async def _wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)


async def _purge(settings: BrokerSettings) -> None:
    connection = await aio_pika.connect(settings.url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Topology.from_settings(settings).ingest_queue, ensure=True)
        await queue.purge()


async def test_full_ingest_backlog_is_503_with_retry_after_until_drained(
    stack: Stack, broker_settings: BrokerSettings
) -> None:
    assert (await stack.stow()).status_code == 200
    assert stack.refusing() == 0.0

    for index in range(BACKLOG_LIMIT):  # no worker: the backlog only grows
        await asyncio.to_thread(stack.publisher.publish_ingest, sample_ingest_message(index))
    await _wait_until(lambda: stack.backpressure.refusing, 10, "refusing after the backlog grew")

    stored_before = sorted(stack.storage.iter_keys())
    refused = await stack.stow()
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == str(RETRY_AFTER)
    assert refused.headers["content-type"].startswith("application/json")
    body = refused.json()
    assert body["reason"] == "ingest_backlog"
    assert "ingest backlog" in body["detail"]
    assert body["retry_after_seconds"] == RETRY_AFTER
    assert sorted(stack.storage.iter_keys()) == stored_before
    assert stack.refusing() == 1.0
    assert stack.refusals() == 1

    await _purge(broker_settings)
    await _wait_until(lambda: not stack.backpressure.refusing, 10, "accepting after the queue drained")
    assert (await stack.stow()).status_code == 200
    assert len(list(stack.storage.iter_keys())) == len(stored_before) + 1
    assert stack.refusing() == 0.0
