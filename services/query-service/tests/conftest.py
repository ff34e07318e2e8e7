"""Fixtures: the query-service in-process over the session's test database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from query_service.testing import Service, query_settings, start_service


@pytest_asyncio.fixture(loop_scope="session")
async def service(db_pool: asyncpg.Pool) -> AsyncIterator[Service]:
    async with start_service(db_pool, query_settings()) as running:
        yield running
