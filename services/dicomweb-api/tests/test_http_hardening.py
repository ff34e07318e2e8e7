"""HTTP hardening of the dicomweb-api: security headers on every response,
size limits on request bodies (JSON under /api/v1; STOW-RS while it
streams), without breaking CORS or the retrieval caching headers.

Against the real app (PostgreSQL, the query-service, filesystem storage);
the body limits also over a real uvicorn server with chunked bodies.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.hardening import API_CSP
from dicomweb_api.settings import DicomwebSettings
from dicomweb_api.testing import ROLES_HEADER, HeaderAuthenticator, part10_bytes, serve, store_instances
from pacs_common.messaging.models import IngestMessage
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import StorageRegistry
from query_service.testing import Service

JSON_LIMIT: Final = 2048
STOW_LIMIT: Final = 64 * 1024
ADMIN: Final = {ROLES_HEADER: "administrator"}
BOUNDARY: Final = "hardening-boundary-44aa"
STOW_TYPE: Final = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
OCTET: Final = 'multipart/related; type="application/octet-stream"'
HOT: Final = "hot"


@pytest.fixture
def dicomweb_settings(tmp_path: Path, query_service: Service) -> DicomwebSettings:
    """The plugin's settings with small body limits (overrides its fixture)."""
    return DicomwebSettings(
        http_host="127.0.0.1",
        http_port=0,
        query_url=query_service.base_url,
        spool_dir=tmp_path / "spool",
        max_api_json_bytes=JSON_LIMIT,
        max_stow_request_bytes=STOW_LIMIT,
    )


@pytest.fixture
def api_context(
    dicomweb_settings: DicomwebSettings,
    db_pool_session: asyncpg.Pool,
    query_service: Service,
    storage_registry: StorageRegistry,
    ingest_publish: Callable[[IngestMessage], None],
) -> ApiContext:
    """The plugin's context on the session's pool: these tests use unique
    names and UIDs, so they skip emptying the tables for each test."""
    return ApiContext(
        settings=dicomweb_settings,
        pool=db_pool_session,
        query=query_service.client,
        storage=storage_registry,
        receiver=InstanceReceiver(storage_registry.get(HOT), HOT, ingest_publish),
    )


def _unique_ae(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}".upper()


def _fresh_ct() -> Dataset:
    """CT_small with UIDs of its own."""
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    ds = dcmread(str(path))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["content-security-policy"] == API_CSP


def _node(ae_title: str, padding: int = 0) -> dict[str, object]:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": 104, "description": "x" * padding}


# -- headers --------------------------------------------------------------------------


async def test_api_and_dicomweb_responses_carry_security_headers(client: httpx.AsyncClient) -> None:
    for url in ("/api/v1/nodes", "/dicom-web/studies", "/health/live", "/api/v1/nodes/NOSUCHNODE"):
        response = await client.get(url)
        assert response.status_code in (200, 204, 404), (url, response.text)
        _assert_security_headers(response)
        assert response.headers["cache-control"] == "no-store", url
        assert "strict-transport-security" not in response.headers  # plain HTTP
    # Errors raised before a route runs (no credentials) too.
    anonymous = await client.get("/api/v1/nodes", headers={ROLES_HEADER: ""})
    _assert_security_headers(anonymous)


async def test_hsts_when_the_request_came_over_https(client: httpx.AsyncClient) -> None:
    behind_ingress = await client.get("/api/v1/nodes", headers={"X-Forwarded-Proto": "https"})
    assert behind_ingress.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
    async with httpx.AsyncClient(
        transport=client._transport, base_url="https://pacs.test", headers=ADMIN
    ) as https_client:
        direct = await https_client.get("/api/v1/nodes")
    assert "max-age=31536000" in direct.headers["strict-transport-security"]


async def test_hsts_always_when_configured(api_context: ApiContext) -> None:
    settings = api_context.settings.model_copy(update={"hsts_always": True, "hsts_max_age_seconds": 600})
    app = create_app(
        dataclasses.replace(api_context, settings=settings), HeaderAuthenticator(), CollectorRegistry()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pacs.test") as http:
        response = await http.get("/health/live")
    assert response.headers["strict-transport-security"] == "max-age=600; includeSubDomains"


async def test_openapi_pages_keep_working_without_the_api_policy(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "content-security-policy" not in docs.headers  # Swagger UI loads its scripts
    assert docs.headers["x-content-type-options"] == "nosniff"


async def test_retrieval_keeps_its_revalidation_caching(
    client: httpx.AsyncClient, api_context: ApiContext, storage_registry: StorageRegistry
) -> None:
    [ct] = await store_instances(api_context.pool, storage_registry.get(HOT), [_fresh_ct()])
    url = (
        f"/dicom-web/studies/{ct.study_instance_uid}/series/{ct.series_instance_uid}"
        f"/instances/{ct.sop_instance_uid}/frames/1"
    )
    response = await client.get(url, headers={"Accept": OCTET})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "private, no-cache"
    etag = response.headers["etag"]
    again = await client.get(url, headers={"Accept": OCTET, "If-None-Match": etag})
    assert again.status_code == 304
    _assert_security_headers(response)


async def test_cors_preflight_still_answered(api_context: ApiContext) -> None:
    origin = "https://viewer.example"
    settings = api_context.settings.model_copy(update={"cors_allowed_origins": [origin]})
    app = create_app(
        dataclasses.replace(api_context, settings=settings), HeaderAuthenticator(), CollectorRegistry()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pacs.test") as http:
        preflight = await http.options(
            "/dicom-web/studies",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "accept",
            },
        )
        simple = await http.get("/dicom-web/studies", headers={"Origin": origin, **ADMIN})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert simple.headers["access-control-allow-origin"] == origin
    assert "ETag" in simple.headers["access-control-expose-headers"]
    _assert_security_headers(simple)


# -- body limits ------------------------------------------------------------------------


async def test_json_body_over_the_limit_is_413_and_changes_nothing(client: httpx.AsyncClient) -> None:
    big_name, small_name = _unique_ae("BIG"), _unique_ae("SMALL")
    big = json.dumps(_node(big_name, padding=JSON_LIMIT)).encode()
    declared = await client.post("/api/v1/nodes", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert f"larger than {JSON_LIMIT} bytes" in declared.json()["detail"]
    _assert_security_headers(declared)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    streamed = await client.post(
        "/api/v1/nodes", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert f"larger than {JSON_LIMIT} bytes" in streamed.json()["detail"]
    assert (await client.get(f"/api/v1/nodes/{big_name}")).status_code == 404

    small = await client.post("/api/v1/nodes", json=_node(small_name, padding=10))
    assert small.status_code == 201, small.text
    assert (await client.get(f"/api/v1/nodes/{small_name}")).json()["ae_title"] == small_name


async def test_body_limits_over_http_with_chunked_bodies(
    api_context: ApiContext, ingest_messages: list[IngestMessage]
) -> None:
    app = create_app(api_context, HeaderAuthenticator(), CollectorRegistry())
    instance = part10_bytes(_fresh_ct())

    async def stow_body(copies: int) -> AsyncIterator[bytes]:
        for _ in range(copies):
            yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            for start in range(0, len(instance), 8192):
                yield instance[start : start + 8192]
            yield b"\r\n"
        yield f"--{BOUNDARY}--\r\n".encode()

    async def json_body() -> AsyncIterator[bytes]:
        data = json.dumps(_node(_unique_ae("HTTP"), padding=4 * JSON_LIMIT)).encode()
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    async with serve(app) as base_url, httpx.AsyncClient(base_url=base_url, headers=ADMIN) as http:
        over = await http.post(
            "/dicom-web/studies", content=stow_body(8), headers={"Content-Type": STOW_TYPE}
        )
        assert over.status_code == 413
        assert str(STOW_LIMIT) in over.json()["detail"]
        assert ingest_messages == []  # a body too large stores nothing

        within = await http.post(
            "/dicom-web/studies", content=stow_body(1), headers={"Content-Type": STOW_TYPE}
        )
        assert within.status_code == 200, within.text
        assert len(ingest_messages) == 1

        json_over = await http.post(
            "/api/v1/nodes", content=json_body(), headers={"Content-Type": "application/json"}
        )
        assert json_over.status_code == 413
        assert "larger than" in json_over.json()["detail"]
