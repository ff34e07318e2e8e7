"""Pytest fixtures (a plugin loaded by the root conftest.py) building the dicomweb-api against real components: the test
database (``db_pool``, empty tables per test), a query-service served
in-process on it, filesystem object storage, and the real app.

* ``client``: an httpx client of the app (ASGI, no network) sending
  ``x-test-roles: {client_roles}`` (administrator unless a test overrides
  the ``client_roles`` fixture);
* ``store``: ``await store([datasets | bytes | paths])`` writes objects to
  the hot tier and indexes them (see :func:`dicomweb_api.testing.store_instances`);
* ``live_server``: the app on a real uvicorn server (for dicomweb-client);
* ``ingest_messages``: what the receiver published (override
  ``ingest_publish`` to use a real broker).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.settings import DicomwebSettings
from dicomweb_api.testing import (
    ROLES_HEADER,
    HeaderAuthenticator,
    Store,
    StoredInstance,
    serve,
    store_instances,
)
from pacs_common.messaging.models import IngestMessage
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.testing.storage_servers import free_port
from query_service.testing import Service, query_settings, start_service

HOT = "hot"


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def query_service(db_pool_session: asyncpg.Pool) -> AsyncIterator[Service]:
    """The query-service, in-process, on the session's test database."""
    async with start_service(db_pool_session, query_settings()) as service:
        yield service


@pytest.fixture
def dicomweb_settings(tmp_path: Path, query_service: Service) -> DicomwebSettings:
    return DicomwebSettings(
        http_host="127.0.0.1", http_port=0, query_url=query_service.base_url, spool_dir=tmp_path / "spool"
    )


@pytest.fixture
def hot_storage(fs_storage: FilesystemStorage) -> ObjectStorage:
    return fs_storage


@pytest.fixture
def storage_registry(hot_storage: ObjectStorage) -> StorageRegistry:
    return StorageRegistry({HOT: hot_storage})


@pytest.fixture
def ingest_messages() -> list[IngestMessage]:
    return []


@pytest.fixture
def ingest_publish(ingest_messages: list[IngestMessage]) -> Callable[[IngestMessage], None]:
    """Records each ingest message (confirmed at once)."""
    return ingest_messages.append


@pytest.fixture
def api_context(
    dicomweb_settings: DicomwebSettings,
    db_pool: asyncpg.Pool,
    query_service: Service,
    storage_registry: StorageRegistry,
    ingest_publish: Callable[[IngestMessage], None],
) -> ApiContext:
    receiver = InstanceReceiver(storage_registry.get(HOT), HOT, ingest_publish)
    return ApiContext(
        settings=dicomweb_settings,
        pool=db_pool,
        query=query_service.client,
        storage=storage_registry,
        receiver=receiver,
    )


@pytest.fixture
def dicomweb_app(api_context: ApiContext) -> FastAPI:
    return create_app(api_context, HeaderAuthenticator(), CollectorRegistry())


@pytest.fixture
def client_roles() -> str:
    """Roles the ``client`` fixture sends (comma-separated)."""
    return "administrator"


@pytest_asyncio.fixture(loop_scope="session")
async def client(dicomweb_app: FastAPI, client_roles: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={ROLES_HEADER: client_roles}
    ) as http:
        yield http


@pytest.fixture
def store(db_pool: asyncpg.Pool, hot_storage: ObjectStorage) -> Store:
    async def _store(objects: Iterable[Dataset | bytes | Path]) -> list[StoredInstance]:
        return await store_instances(db_pool, hot_storage, objects, tier=HOT)

    return _store


@pytest_asyncio.fixture(loop_scope="session")
async def live_server(api_context: ApiContext) -> AsyncIterator[str]:
    """The app on a real uvicorn server; its base URL (``http://127.0.0.1:{port}``),
    which is also its ``public_base_url`` (dicomweb-client sends ``Host``
    without the port, so URLs taken from the request would lack it)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = api_context.settings.model_copy(update={"public_base_url": base_url})
    app = create_app(
        dataclasses.replace(api_context, settings=settings), HeaderAuthenticator(), CollectorRegistry()
    )
    async with serve(app, port) as served:
        yield served
