"""The asyncpg connection pool every service uses to reach the index.

Services talk to PostgreSQL with asyncpg directly (SQLAlchemy is only
alembic's engine): the hot paths are a handful of hand-written, set-based
statements, and asyncpg's binary protocol and prepared-statement cache make
them cheap.  The pool replaces connections that broke (a PostgreSQL
restart), so callers only have to retry the operation that failed.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from pacs_common.settings import DatabaseSettings

__all__ = ["DatabasePool", "create_pool", "is_connection_error"]

#: The pool type services pass around.
DatabasePool = asyncpg.Pool


def _dumps(value: Any) -> str:
    # allow_nan=False: jsonb refuses NaN/Infinity, so fail here with a clear error.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def _init_connection(connection: asyncpg.Connection) -> None:
    """Python dicts/lists in and out of json/jsonb columns."""
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(type_name, encoder=_dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: DatabaseSettings, *, application_name: str | None = None) -> asyncpg.Pool:
    """Open a pool on ``settings.url``.

    ``command_timeout`` bounds every statement, so a stuck connection turns
    into an error the caller can retry instead of a hung worker.  Connections
    idle for five minutes are closed, which also sheds connections a
    restarted server left half-open.
    """
    server_settings = {"application_name": application_name} if application_name else None
    pool = await asyncpg.create_pool(
        dsn=settings.url,
        min_size=min(settings.pool_min_size, settings.pool_max_size),
        max_size=settings.pool_max_size,
        command_timeout=settings.command_timeout_seconds,
        max_inactive_connection_lifetime=300.0,
        init=_init_connection,
        server_settings=server_settings,
    )
    return pool


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means "the database is unreachable right now"
    (retry later), as opposed to an error in what was asked of it."""
    return isinstance(
        exc,
        asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.InterfaceError
        | asyncpg.exceptions.PostgresConnectionError
        # shutdown, crash recovery, "the database system is starting up", statement timeout
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError  # too many connections, disk full
        | asyncpg.exceptions.ReadOnlySQLTransactionError  # failover to a standby in progress
        | ConnectionError
        | OSError
        | TimeoutError,
    )
