"""Test helpers: the query-service served in-process on a free port, and
instances built with pydicom indexed the way the ingest worker does.

For this service's tests and for services that test against a real
query-service (the gateway's C-FIND/C-MOVE).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.query.client import AsyncQueryClient
from pacs_common.query.models import QueryCompletion, QueryRequest
from pacs_common.settings import DuplicatePolicy, QuerySettings
from pacs_common.telemetry import serve_http
from query_service.app import create_app

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def dataset(
    study: str,
    series: str,
    sop: str,
    *,
    patient_id: str = "P1",
    patient_name: str = "DOE^JOHN",
    modality: str = "CT",
    **attributes: Any,
) -> Dataset:
    """A small instance; ``attributes`` are set by keyword (e.g. StudyDate="20200101")."""
    ds = Dataset()
    ds.SOPClassUID = attributes.pop("SOPClassUID", CT_IMAGE_STORAGE)
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def item_from_bytes(data: bytes, key: str) -> IndexItem:
    parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=1024)
    location = StorageLocation(
        tier="hot", backend="filesystem", key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    return IndexItem.build(parsed, location, T0, "MODALITY")


async def index(pool: asyncpg.Pool, datasets: Iterable[Dataset]) -> None:
    items = [item_from_bytes(_bytes(ds), f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm") for ds in datasets]
    await InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)


async def index_files(pool: asyncpg.Pool, paths: Iterable[str]) -> None:
    def read() -> list[IndexItem]:
        return [item_from_bytes(Path(path).read_bytes(), path) for path in paths]

    items = await asyncio.to_thread(read)
    await InstanceIndex(pool).index_batch(items, duplicate_policy=DuplicatePolicy.KEEP_FIRST)


def query_settings(**overrides: Any) -> QuerySettings:
    return QuerySettings(http_host="127.0.0.1", http_port=0, **overrides)


class Service:
    """A running query-service and a client of it."""

    def __init__(self, base_url: str, registry: CollectorRegistry) -> None:
        self.base_url = base_url
        self.registry = registry
        self.client = AsyncQueryClient(base_url, timeout_seconds=10)


@contextlib.asynccontextmanager
async def start_service(pool: asyncpg.Pool, settings: QuerySettings) -> AsyncIterator[Service]:
    registry = CollectorRegistry()
    server = await serve_http(create_app(pool, settings, registry), "127.0.0.1", 0)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    service = Service(f"http://127.0.0.1:{port}", registry)
    try:
        yield service
    finally:
        await service.client.aclose()
        server.should_exit = True


async def find_all(
    client: AsyncQueryClient, request: QueryRequest
) -> tuple[list[dict[str, Any]], QueryCompletion]:
    """Every match of ``request`` and the completion line."""
    stream = await client.find(request)
    matches = [match async for match in stream]
    assert stream.completion is not None
    return matches, stream.completion


def values(matches: Iterable[dict[str, Any]], tag: str) -> list[Any]:
    """The first value of ``tag`` in each match (None when it has none)."""
    return [(match.get(tag, {}).get("Value") or [None])[0] for match in matches]
