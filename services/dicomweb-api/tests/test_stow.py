"""STOW-RS against the real app: PostgreSQL, RabbitMQ, filesystem storage.

Each test builds the app with a real InstanceReceiver publishing through a
BlockingPublisher to the test broker namespace, posts multipart/related
bodies (chunked: the body is an async generator) and checks the response,
the stored objects and the ingest messages in the queue.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security import AuthenticationError, Principal, Role
from dicomweb_api.settings import DicomwebSettings
from pacs_common.messaging.blocking import BlockingPublisher
from pacs_common.messaging.models import IngestMessage
from pacs_common.messaging.topology import Topology
from pacs_common.query import AsyncQueryClient
from pacs_common.receiving import InstanceReceiver, inspect_part10, instance_key
from pacs_common.settings import BrokerSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.telemetry import serve_http
from pacs_common.testing.broker import TcpProxy, free_port, settings_via_proxy

BOUNDARY = "stow-test-boundary-7f3a"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MAX_BYTES = 4 * 1024 * 1024


class _HeaderAuthenticator:
    """Roles named in a test header; no header means no credentials."""

    async def authenticate(self, request: Request) -> Principal:
        roles = request.headers.get("x-test-roles")
        if roles is None:
            raise AuthenticationError("no credentials")
        return Principal(
            subject="tester", roles=frozenset(Role(r) for r in roles.split(",") if r), method="token"
        )


TECHNOLOGIST = {"x-test-roles": "technologist"}


def _testdata(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path)).read_bytes()


def generated_instance(
    study: str, series: str, *, modality: str = "CT", number: int = 1, size: int = 4
) -> bytes:
    """A small CT-like Part 10 object with the given study and series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "STOW-1"
    ds.PatientName = "Stow^Test"
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.StudyDate = "20260101"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (size * size // 128)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


async def multipart_body(
    parts: list[tuple[str | None, bytes]], *, close: bool = True
) -> AsyncIterator[bytes]:
    """A multipart/related body in small chunks (sent chunked by httpx)."""
    for content_type, data in parts:
        header = f"--{BOUNDARY}\r\n"
        if content_type is not None:
            header += f"Content-Type: {content_type}\r\n"
        yield (header + "\r\n").encode()
        for start in range(0, len(data), 7001):
            yield data[start : start + 7001]
        yield b"\r\n"
    if close:
        yield f"--{BOUNDARY}--\r\n".encode()


def dicom_parts(*objects: bytes) -> list[tuple[str | None, bytes]]:
    return [("application/dicom", o) for o in objects]


def identity_of(data: bytes, tmp_path: Path) -> tuple[str, str, str, str]:
    path = tmp_path / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    identity, _ = inspect_part10(path)
    return (
        identity.sop_class_uid,
        identity.sop_instance_uid,
        identity.study_instance_uid,
        identity.series_instance_uid,
    )


def stored_key(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    identity, _ = inspect_part10(path)
    return instance_key(identity)


async def queued_ingest_messages(settings: BrokerSettings) -> list[IngestMessage]:
    """Take every message waiting in the namespace's ingest queue."""
    connection = await aio_pika.connect(settings.url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology.from_settings(settings).ingest_queue, passive=True)
        messages: list[IngestMessage] = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(IngestMessage.model_validate_json(message.body))
        return messages
    finally:
        await connection.close()


def uids_in(dataset: dict[str, Any], sequence: str) -> list[str]:
    return [item["00081155"]["Value"][0] for item in dataset.get(sequence, {}).get("Value", [])]


def reasons_in(dataset: dict[str, Any]) -> list[int]:
    return [item["00081197"]["Value"][0] for item in dataset["00081198"]["Value"]]


class Stack:
    """The app and what it writes to."""

    def __init__(self, app: FastAPI, storage: FilesystemStorage, broker_settings: BrokerSettings) -> None:
        self.app = app
        self.storage = storage
        self.broker_settings = broker_settings

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://pacs.test")

    def stored_keys(self) -> list[str]:
        return sorted(self.storage.iter_keys())


@pytest.fixture
def publisher(broker_settings: BrokerSettings) -> Iterator[BlockingPublisher]:
    started = BlockingPublisher(broker_settings)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def build_stack(
    pool: asyncpg.Pool,
    tmp_path: Path,
    publisher: BlockingPublisher,
    broker_settings: BrokerSettings,
    query: AsyncQueryClient,
) -> Stack:
    storage = FilesystemStorage(tmp_path / "hot", fsync=False)
    settings = DicomwebSettings(spool_dir=tmp_path / "spool", max_stow_request_bytes=MAX_BYTES)
    context = ApiContext(
        settings=settings,
        pool=pool,
        query=query,
        storage=StorageRegistry({"hot": storage}),
        receiver=InstanceReceiver(storage, "hot", publisher.publish_ingest),
    )
    return Stack(create_app(context, _HeaderAuthenticator(), CollectorRegistry()), storage, broker_settings)


@pytest_asyncio.fixture
async def query_client() -> AsyncIterator[AsyncQueryClient]:
    client = AsyncQueryClient("http://127.0.0.1:9", timeout_seconds=1.0)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def stack(
    db_pool: asyncpg.Pool,
    tmp_path: Path,
    publisher: BlockingPublisher,
    broker_settings: BrokerSettings,
    query_client: AsyncQueryClient,
) -> Stack:
    return build_stack(db_pool, tmp_path, publisher, broker_settings, query_client)


async def test_stores_several_instances_sent_chunked(stack: Stack, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    objects = [
        _testdata("CT_small.dcm"),
        _testdata("MR_small.dcm"),
        generated_instance(study, series, number=1),
        generated_instance(study, series, number=2),
        # 2 MiB: spans several parser batches and many chunks.
        generated_instance(study, series, number=3, size=1024),
    ]
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(dicom_parts(*objects)),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    identities = [identity_of(o, tmp_path) for o in objects]
    assert uids_in(body, "00081199") == [i[1] for i in identities]
    assert "00081198" not in body
    assert "Value" not in body["00081190"]  # several studies: no single study URL
    first = body["00081199"]["Value"][2]
    assert first["00081150"]["Value"] == [CTImageStorage]
    assert first["00081190"]["Value"] == [
        f"http://pacs.test/dicom-web/studies/{study}/series/{series}/instances/{identities[2][1]}"
    ]
    # Byte-identical in storage, nothing else there (the spool is not storage).
    for data in objects:
        with stack.storage.open(stored_key(data, tmp_path)) as stored:
            assert stored.read() == data
    assert len(stack.stored_keys()) == len(objects)
    assert not any((tmp_path / "spool").iterdir())
    # One ingest message per instance, pointing at the stored object.
    messages = await queued_ingest_messages(stack.broker_settings)
    assert sorted(m.sop_instance_uid for m in messages) == sorted(i[1] for i in identities)
    for message in messages:
        assert message.source.protocol == "stow"
        assert message.location.tier == "hot"
        assert stack.storage.stat(message.location.key) is not None


async def test_study_in_the_path_refuses_instances_of_other_studies(stack: Stack, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    mine = generated_instance(study, series)
    other = _testdata("CT_small.dcm")
    async with stack.client() as client:
        response = await client.post(
            f"/dicom-web/studies/{study}",
            content=multipart_body(dicom_parts(mine, other)),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )

    assert response.status_code == 202, response.text
    assert response.headers["warning"].startswith(
        '299 pacs "1 of 2 instances were not stored; first: Study Instance UID'
    )
    body = response.json()
    assert body["00081190"]["Value"] == [f"http://pacs.test/dicom-web/studies/{study}"]
    assert uids_in(body, "00081199") == [identity_of(mine, tmp_path)[1]]
    assert uids_in(body, "00081198") == [identity_of(other, tmp_path)[1]]
    assert reasons_in(body) == [0xA900]
    assert stack.stored_keys() == [stored_key(mine, tmp_path)]
    assert [m.sop_instance_uid for m in await queued_ingest_messages(stack.broker_settings)] == [
        identity_of(mine, tmp_path)[1]
    ]


async def test_non_dicom_parts_fail_and_the_rest_is_stored(stack: Stack, tmp_path: Path) -> None:
    good = generated_instance(generate_uid(), generate_uid())
    parts: list[tuple[str | None, bytes]] = [
        ("text/plain", b"hello"),
        ("application/dicom", b"not DICOM at all" * 100),
        ("application/dicom", good),
    ]
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(parts),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )

    assert response.status_code == 202, response.text
    body = response.json()
    assert reasons_in(body) == [0xC000, 0xC000]
    assert uids_in(body, "00081199") == [identity_of(good, tmp_path)[1]]
    assert stack.stored_keys() == [stored_key(good, tmp_path)]


async def test_nothing_stored_is_409(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body([("application/dicom", b"\x00" * 300)]),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )
    assert response.status_code == 409, response.text
    assert reasons_in(response.json()) == [0xC000]
    assert "00081199" not in response.json()
    assert stack.stored_keys() == []


@pytest.mark.parametrize(
    ("valid_part_first", "tail"),
    [
        pytest.param(False, b"this is not multipart at all", id="garbage"),
        pytest.param(True, b"", id="no-closing-boundary"),
        pytest.param(False, f"--{BOUNDARY}--\r\n".encode(), id="no-parts"),
        pytest.param(True, f"--{BOUNDARY}\r\nno header separator\r\n\r\n".encode(), id="bad-part-header"),
    ],
)
async def test_malformed_multipart_is_400_and_stores_nothing(
    stack: Stack, valid_part_first: bool, tail: bytes
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        # A valid first part, then the malformed rest: nothing may be stored.
        if valid_part_first:
            async for chunk in multipart_body(dicom_parts(_testdata("CT_small.dcm")), close=False):
                yield chunk
        yield tail

    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies", content=chunks(), headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST}
        )
    assert response.status_code == 400, response.text
    assert stack.stored_keys() == []
    assert await queued_ingest_messages(stack.broker_settings) == []


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/dicom", 415),
        ("application/json", 415),
        (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415),
        (f"multipart/form-data; boundary={BOUNDARY}", 415),
        ('multipart/related; type="application/dicom"', 400),
    ],
)
async def test_content_type_is_checked(stack: Stack, content_type: str, status: int) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(dicom_parts(_testdata("CT_small.dcm"))),
            headers={"Content-Type": content_type, **TECHNOLOGIST},
        )
    assert response.status_code == status, response.text
    assert stack.stored_keys() == []


async def test_huge_declared_content_length_is_413(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=b"x" * 10,
            headers={"Content-Type": CONTENT_TYPE, "Content-Length": str(10**15), **TECHNOLOGIST},
        )
    assert response.status_code == 413, response.text
    assert stack.stored_keys() == []


async def test_chunked_body_beyond_the_limit_is_413_and_stores_nothing(stack: Stack) -> None:
    study, series = generate_uid(), generate_uid()
    first = generated_instance(study, series)
    filler = b"\x00" * (MAX_BYTES + 1)
    parts: list[tuple[str | None, bytes]] = [("application/dicom", first), ("application/dicom", filler)]
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(parts),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )
    assert response.status_code == 413, response.text
    assert stack.stored_keys() == []
    assert await queued_ingest_messages(stack.broker_settings) == []


async def test_store_needs_the_store_permission(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(dicom_parts(_testdata("CT_small.dcm"))),
            headers={"Content-Type": CONTENT_TYPE, "x-test-roles": "viewer"},
        )
    assert response.status_code == 403
    assert stack.stored_keys() == []


async def test_broker_down_is_a_failure_never_success(
    db_pool: asyncpg.Pool,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    amqp_proxy: TcpProxy,
    query_client: AsyncQueryClient,
) -> None:
    proxied = settings_via_proxy(broker_settings, amqp_proxy).model_copy(
        update={"publish_timeout_seconds": 1.0}
    )
    publisher = BlockingPublisher(proxied)
    publisher.start()
    try:
        stack = build_stack(db_pool, tmp_path, publisher, broker_settings, query_client)
        amqp_proxy.cut()
        objects = [generated_instance(generate_uid(), generate_uid()), _testdata("CT_small.dcm")]
        async with stack.client() as client:
            response = await client.post(
                "/dicom-web/studies",
                content=multipart_body(dicom_parts(*objects)),
                headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
            )
    finally:
        publisher.stop()

    assert response.status_code == 409, response.text
    body = response.json()
    assert "00081199" not in body
    assert reasons_in(body) == [0xA700, 0xA700]
    assert sorted(uids_in(body, "00081198")) == sorted(identity_of(o, tmp_path)[1] for o in objects)
    assert await queued_ingest_messages(broker_settings) == []


@pytest_asyncio.fixture
async def live_url(stack: Stack) -> AsyncIterator[str]:
    """The STOW app on a real uvicorn server (real HTTP/1.1 framing)."""
    port = free_port()
    server = await serve_http(stack.app, "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        for _ in range(200):
            if not server.server_state.connections and not any(s.is_serving() for s in server.servers):
                break
            await asyncio.sleep(0.05)


async def test_over_http_chunked_and_bogus_content_length(
    stack: Stack, live_url: str, tmp_path: Path
) -> None:
    objects = [_testdata("CT_small.dcm"), generated_instance(generate_uid(), generate_uid(), size=512)]
    async with httpx.AsyncClient(base_url=live_url) as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(dicom_parts(*objects)),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 200, response.text
    assert uids_in(response.json(), "00081199") == [identity_of(o, tmp_path)[1] for o in objects]

    # A client announcing a petabyte and sending a few bytes is refused at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", int(live_url.rsplit(":", 1)[1]))
    try:
        writer.write(
            (
                "POST /dicom-web/studies HTTP/1.1\r\nHost: pacs.test\r\nx-test-roles: technologist\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {10**15}\r\n\r\n--{BOUNDARY}\r\n"
            ).encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"413"
    assert len(stack.stored_keys()) == len(objects)


async def test_storage_failure_is_out_of_resources(stack: Stack, tmp_path: Path) -> None:
    # The hot tier's root is a file: every write fails.
    root = tmp_path / "hot"
    root.write_bytes(b"not a directory")
    async with stack.client() as client:
        response = await client.post(
            "/dicom-web/studies",
            content=multipart_body(dicom_parts(_testdata("CT_small.dcm"))),
            headers={"Content-Type": CONTENT_TYPE, **TECHNOLOGIST},
        )
    assert response.status_code == 409, response.text
    assert reasons_in(response.json()) == [0xA700]
    assert await queued_ingest_messages(stack.broker_settings) == []
