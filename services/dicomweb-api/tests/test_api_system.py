"""``/api/v1/system``: version, health against a real database and
query-service, and the effective configuration with secrets redacted."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import metadata

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from dicomweb_api.api.system import REDACTED, redact_settings, redact_url
from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.settings import DicomwebSettings
from dicomweb_api.testing import HeaderAuthenticator
from pacs_common.settings import BrokerSettings

VIEWER = {"x-test-roles": "viewer"}
ADMIN = {"x-test-roles": "administrator"}
UNREACHABLE = "http://127.0.0.1:9"


@contextlib.asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test/api/v1"
    ) as http:
        yield http


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app (conftest's ``dicomweb_app``, its query-service running) under
    /api/v1, sending no credentials unless told."""
    async with _client(dicomweb_app) as http:
        yield http


@pytest.fixture
async def client_without_query_service(api_context: ApiContext) -> AsyncIterator[httpx.AsyncClient]:
    """The app configured with a query-service nobody answers at."""
    settings = api_context.settings.model_copy(update={"query_url": UNREACHABLE})
    app = create_app(replace(api_context, settings=settings), HeaderAuthenticator(), CollectorRegistry())
    async with _client(app) as http:
        yield http


async def test_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/system/version")).status_code == 401
    response = await client.get("/system/version", headers=VIEWER)
    assert response.status_code == 200
    body = response.json()
    assert body["service"] == "dicomweb-api"
    assert body["version"] == metadata.version("dicomweb-api")
    assert body["components"]["pacs-common"] == metadata.version("pacs-common")
    assert body["python"].startswith("3.11")


async def test_health_when_everything_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/system/health", headers=VIEWER)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "database": "ok",
        "query_service": "ok",
    }
    assert body["checks"]["database"]["latency_ms"] >= 0


async def test_health_without_the_query_service(client_without_query_service: httpx.AsyncClient) -> None:
    response = await client_without_query_service.get("/system/health", headers=VIEWER)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["query_service"]["status"] == "failing"
    assert body["checks"]["query_service"]["detail"]


async def test_config_is_for_administrators_only(client: httpx.AsyncClient) -> None:
    for roles in ("viewer", "technologist", "radiologist"):
        response = await client.get("/system/config", headers={"x-test-roles": roles})
        assert response.status_code == 403


async def test_config_redacts_secrets(
    client: httpx.AsyncClient, dicomweb_settings: DicomwebSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_DB_URL", "postgresql://pacs:dbpassword@db.example:5432/pacs")
    monkeypatch.setenv("PACS_AMQP_URL", "amqp://rabbit:mqpassword@mq.example:5672/")
    monkeypatch.setenv("PACS_STORAGE_HOT_S3_SECRET_ACCESS_KEY", "s3secret")
    monkeypatch.setenv("PACS_STORAGE_HOT_AZURE_CONNECTION_STRING", "AccountName=a;AccountKey=azuresecret")
    response = await client.get("/system/config", headers=ADMIN)
    assert response.status_code == 200
    text = response.text
    for secret in ("dbpassword", "mqpassword", "s3secret", "azuresecret"):
        assert secret not in text
    body = response.json()
    assert body["database"]["url"] == f"postgresql://pacs:{REDACTED}@db.example:5432/pacs"
    assert body["broker"]["url"] == f"amqp://rabbit:{REDACTED}@mq.example:5672/"
    assert body["storage"]["hot"]["s3_secret_access_key"] == REDACTED
    assert body["storage"]["hot"]["azure_connection_string"] == REDACTED
    assert body["storage"]["hot"]["backend"] == "filesystem"
    assert body["dicomweb"]["query_url"] == dicomweb_settings.query_url
    assert body["dicomweb"]["http_port"] == dicomweb_settings.http_port
    assert body["telemetry"]["log_level"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:5432/pacs", "postgresql://postgres@127.0.0.1:5432/pacs"),
        ("postgresql://u:p@h/db", f"postgresql://u:{REDACTED}@h/db"),
        ("postgresql://u:p@[::1]:5432/db", f"postgresql://u:{REDACTED}@[::1]:5432/db"),
        ("postgresql://h/db?user=u&password=p&sslmode=require", f"postgresql://h/db?user=u&password={REDACTED}&sslmode=require"),
        ("http://h:notaport/", REDACTED),
    ],
)  # fmt: skip
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_secret_str_without_url_is_fully_redacted() -> None:
    assert redact_settings(BrokerSettings(url=SecretStr("opaque")))["url"] == REDACTED


async def test_openapi_documents_the_bodies(client: httpx.AsyncClient) -> None:
    response = await client.get("http://test/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    schemas = spec["components"]["schemas"]
    for name in ("StudyDetail", "InstanceDetail", "RemoteNodeCreate", "WorklistItemCreate", "EchoResult"):
        assert name in schemas
    assert "/api/v1/studies/{study_instance_uid}" in spec["paths"]
