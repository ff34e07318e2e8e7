"""Pytest fixtures for tests against a real PostgreSQL.

The server is shared (a developer's machine, CI), so each test session
creates a database of its own with a unique name, migrates it once, and drops
it at the end.  Tests that write to the index ask for ``clean_db`` (or
``db_pool``, which implies it) and start from empty tables.

Set ``PACS_TEST_DB_URL`` to use another server than
``postgresql://postgres@127.0.0.1:5432/postgres``; only its host, port and
credentials are used.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
from asyncpg.pool import PoolConnectionProxy
from sqlalchemy.engine import make_url

from pacs_common.db.migrate import drop_database, upgrade
from pacs_common.db.pool import create_pool
from pacs_common.settings import DatabaseSettings

DB_URL_ENV = "PACS_TEST_DB_URL"
DEFAULT_DB_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def database_url_for_tests(name: str) -> str:
    """The test server's URL with database ``name``."""
    base = make_url(os.environ.get(DB_URL_ENV, DEFAULT_DB_URL))
    return base.set(database=name).render_as_string(hide_password=False)


def unique_database_settings(prefix: str = "pacs_test") -> DatabaseSettings:
    """Settings naming a database that does not exist yet."""
    return DatabaseSettings(
        url=database_url_for_tests(f"{prefix}_{uuid.uuid4().hex[:12]}"),
        pool_min_size=0,
        pool_max_size=8,
        command_timeout_seconds=30.0,
    )


async def truncate_all(
    connection: asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record],
) -> None:
    """Empty every table of the schema but alembic's, whoever added it."""
    tables = await connection.fetch(
        """
        SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) AS name
        FROM pg_tables
        WHERE schemaname = current_schema() AND tablename <> 'alembic_version'
        """
    )
    if tables:
        names = ", ".join(t["name"] for t in tables)
        await connection.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


@pytest.fixture(scope="session")
def database_settings() -> Iterator[DatabaseSettings]:
    """A migrated database for this test session, dropped at its end."""
    settings = unique_database_settings()
    upgrade(settings)
    try:
        yield settings
    finally:
        drop_database(settings)


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def db_pool_session(database_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_settings, application_name="pacs-tests")
    try:
        yield pool
    finally:
        await pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def clean_db(db_pool_session: asyncpg.Pool) -> AsyncIterator[None]:
    """Empty tables before the test."""
    async with db_pool_session.acquire() as connection:
        await truncate_all(connection)
    yield


@pytest_asyncio.fixture(loop_scope="session")
async def db_pool(db_pool_session: asyncpg.Pool, clean_db: None) -> asyncpg.Pool:
    """The session's pool, on empty tables."""
    return db_pool_session
