"""Schema migrations of the index: alembic, driven from code.

``pacs migrate`` (and the Helm pre-install/pre-upgrade Job, and the local
runner) call :func:`upgrade`.  There is no alembic.ini: the configuration is
built here, pointing at the migrations shipped inside this package, so the
same code migrates from a wheel, a container or a checkout.

One driver everywhere: alembic runs on SQLAlchemy's asyncpg dialect, and the
database bootstrap uses asyncpg directly.  Several pods may start migrating
at once; a transaction-scoped advisory lock makes them take turns, and the
ones that come second find the schema at head and do nothing.  All
migrations run in one transaction (PostgreSQL DDL is transactional): an
upgrade applies completely or not at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pacs_common.settings import DatabaseSettings

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "downgrade",
    "drop_database",
    "head_revision",
    "upgrade",
]

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: "PACSMIGR" as a bigint.
_ADVISORY_LOCK_KEY: Final = int.from_bytes(b"PACSMIGR", "big")
_MAINTENANCE_DB: Final = "postgres"

T = TypeVar("T")


def _url(dsn: str) -> URL:
    url = make_url(dsn)
    if url.database is None:
        raise ValueError("the database URL names no database")
    return url


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _sqlalchemy_url(url: URL) -> str:
    return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def alembic_config(settings: DatabaseSettings) -> Config:
    """Alembic configuration for the index, e.g. for ``command.revision``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%': escape it (URL-encoded passwords).
    config.set_main_option("sqlalchemy.url", _sqlalchemy_url(_url(settings.url)).replace("%", "%%"))
    config.attributes["database_settings"] = settings
    return config


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion from sync code, even when the calling
    thread already runs an event loop (then on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _ensure_database(url: URL) -> None:
    """Create the database when it does not exist.

    Connecting to the database itself first means an account that may not
    connect to ``postgres`` (managed services) works as long as the database
    was created for it.
    """
    try:
        connection = await asyncpg.connect(_asyncpg_dsn(url))
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await connection.close()
        return
    maintenance = await asyncpg.connect(_asyncpg_dsn(url.set(database=_MAINTENANCE_DB)))
    try:
        await maintenance.execute(f"CREATE DATABASE {_quote_identifier(str(url.database))}")
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        pass  # another migrator created it meanwhile (the latter when at the same instant)
    finally:
        await maintenance.close()


def _alembic(connection: Connection, config: Config, direction: str, revision: str) -> None:
    config.attributes["connection"] = connection
    if direction == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def _migrate(settings: DatabaseSettings, direction: str, revision: str) -> None:
    url = _url(settings.url)
    if direction == "upgrade":
        await _ensure_database(url)
    engine = create_async_engine(_sqlalchemy_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            # Held until commit: concurrent migrators queue here.
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
            await connection.run_sync(_alembic, alembic_config(settings), direction, revision)
    finally:
        await engine.dispose()


def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    """Create the database if needed and migrate it to ``revision``."""
    _run(_migrate(settings, "upgrade", revision))


def downgrade(settings: DatabaseSettings, revision: str) -> None:
    """Migrate down to ``revision`` ("base": no schema).  Destroys data."""
    _run(_migrate(settings, "downgrade", revision))


async def _current_revision(settings: DatabaseSettings) -> str | None:
    try:
        connection = await asyncpg.connect(_asyncpg_dsn(_url(settings.url)))
    except asyncpg.InvalidCatalogNameError:
        return None
    try:
        value = await connection.fetchval("SELECT version_num FROM alembic_version LIMIT 1")
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await connection.close()
    return str(value) if value is not None else None


def current_revision(settings: DatabaseSettings) -> str | None:
    """The revision the database is at; None when it has no schema (or does
    not exist)."""
    return _run(_current_revision(settings))


def head_revision() -> str:
    """The newest revision this code ships (``pacs status`` compares)."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


async def _drop_database(settings: DatabaseSettings) -> None:
    url = _url(settings.url)
    maintenance = await asyncpg.connect(_asyncpg_dsn(url.set(database=_MAINTENANCE_DB)))
    try:
        await maintenance.execute(
            f"DROP DATABASE IF EXISTS {_quote_identifier(str(url.database))} WITH (FORCE)"
        )
    finally:
        await maintenance.close()


def drop_database(settings: DatabaseSettings) -> None:
    """Drop the database, disconnecting its sessions (tests)."""
    _run(_drop_database(settings))
