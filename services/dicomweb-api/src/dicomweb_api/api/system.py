"""``/system``: version, health of what this service depends on, and its
effective configuration with secrets redacted."""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Annotated, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, SecretStr

from dicomweb_api.api.models import ComponentHealth, EffectiveConfiguration, SystemHealth, SystemVersion
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.settings import BrokerSettings, DatabaseSettings, StorageTierSettings, TelemetrySettings

__all__ = ["create_router", "redact_settings", "redact_url"]

SERVICE: Final = "dicomweb-api"
PACKAGES: Final = ("dicomweb-api", "pacs-common")
REDACTED: Final = "**********"
HEALTH_TIMEOUT_SECONDS: Final = 5.0
# Field and query-parameter names whose values are secret whatever their type.
_SECRET_WORDS: Final = ("password", "secret", "token", "credential", "connection_string", "private")

Context = Annotated[ApiContext, Depends(get_context)]


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and secret query parameters masked."""
    try:
        parts = urlsplit(url)
        password = parts.password
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if password is not None:
        host = hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:{REDACTED}@{host}" + (f":{port}" if port is not None else "")
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _is_secret_name(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _looks_like_url(value: str) -> bool:
    return "://" in value


def _redact_value(name: str, value: Any) -> Any:
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return redact_url(secret) if _looks_like_url(secret) and "@" in secret else REDACTED
    if value is None:
        return None
    if _is_secret_name(name):
        return REDACTED
    if isinstance(value, str) and _looks_like_url(value):
        return redact_url(value)
    return value


def redact_settings(settings: BaseModel) -> dict[str, Any]:
    """The fields of ``settings`` as JSON values, secrets masked."""
    dumped = settings.model_dump(mode="json")
    redacted: dict[str, Any] = {}
    for name in type(settings).model_fields:
        raw = getattr(settings, name)
        sensitive = isinstance(raw, SecretStr) or _is_secret_name(name)
        if sensitive or (isinstance(raw, str) and _looks_like_url(raw)):
            redacted[name] = _redact_value(name, raw)
        else:
            redacted[name] = dumped[name]
    return redacted


async def _timed(check: Callable[[], Awaitable[None]]) -> ComponentHealth:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), timeout=HEALTH_TIMEOUT_SECONDS)
    except Exception as exc:
        elapsed = (time.perf_counter() - started) * 1000
        detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return ComponentHealth(status="failing", latency_ms=round(elapsed, 3), detail=detail)
    elapsed = (time.perf_counter() - started) * 1000
    return ComponentHealth(status="ok", latency_ms=round(elapsed, 3))


def create_router() -> APIRouter:
    router = APIRouter(prefix="/system", tags=["system"])

    @router.get(
        "/version",
        response_model=SystemVersion,
        summary="Package versions",
        dependencies=[Depends(require(Permission.READ))],
    )
    async def get_version() -> SystemVersion:
        components = {name: metadata.version(name) for name in PACKAGES}
        return SystemVersion(
            service=SERVICE,
            version=components[SERVICE],
            components=components,
            python=platform.python_version(),
        )

    @router.get(
        "/health",
        response_model=SystemHealth,
        summary="Whether the database and the query-service answer",
        responses={503: {"model": SystemHealth, "description": "a dependency is failing"}},
        dependencies=[Depends(require(Permission.READ))],
    )
    async def get_health(context: Context, response: Response) -> SystemHealth:
        async def database() -> None:
            async with context.pool.acquire() as connection:
                await connection.fetchval("SELECT 1")

        async def query_service() -> None:
            base = context.settings.query_url.rstrip("/")
            async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_SECONDS) as client:
                answer = await client.get(f"{base}/health/ready")
            if answer.status_code != 200:
                raise RuntimeError(f"/health/ready answered {answer.status_code}")

        database_health, query_health = await asyncio.gather(_timed(database), _timed(query_service))
        checks = {"database": database_health, "query_service": query_health}
        healthy = all(check.status == "ok" for check in checks.values())
        if not healthy:
            response.status_code = 503
        return SystemHealth(status="ok" if healthy else "degraded", checks=checks)

    @router.get(
        "/config",
        response_model=EffectiveConfiguration,
        summary="The effective configuration, secrets redacted",
        dependencies=[Depends(require(Permission.ADMIN))],
    )
    async def get_config(context: Context) -> EffectiveConfiguration:
        # The database, broker, storage and telemetry settings come from the
        # same PACS_* environment main() builds them from.
        return EffectiveConfiguration(
            dicomweb=redact_settings(context.settings),
            database=redact_settings(DatabaseSettings()),
            broker=redact_settings(BrokerSettings()),
            storage={tier: redact_settings(StorageTierSettings.for_tier(tier)) for tier in context.storage},
            telemetry=redact_settings(TelemetrySettings()),
        )

    return router
