"""Matches stream as they come; a client that goes away (C-CANCEL) ends the
query and gives its database connection back; metrics count queries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio

from pacs_common.db.pool import create_pool
from pacs_common.query.models import QueryLevel, QueryRequest, RetrieveRequest
from pacs_common.settings import DatabaseSettings
from query_service.testing import Service, dataset, find_all, index, query_settings, start_service


@pytest_asyncio.fixture(loop_scope="session")
async def one_connection(
    database_settings: DatabaseSettings, db_pool: asyncpg.Pool
) -> AsyncIterator[asyncpg.Pool]:
    """A pool of a single connection: a query that kept it would block the next one."""
    settings = database_settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1})
    pool = await create_pool(settings)
    try:
        yield pool
    finally:
        await pool.close()


async def test_closing_a_stream_early_ends_the_query(
    db_pool: asyncpg.Pool, one_connection: asyncpg.Pool
) -> None:
    await index(db_pool, [dataset(f"1.9.{n}", f"1.9.{n}.1", f"1.9.{n}.1.1") for n in range(300)])
    async with start_service(one_connection, query_settings(fetch_size=5)) as service:
        stream = await service.client.find(QueryRequest(level=QueryLevel.STUDY))
        async for _ in stream:
            break  # C-CANCEL after the first match
        # The service's only connection is free again: the next query completes.
        matches, done = await asyncio.wait_for(
            find_all(service.client, QueryRequest(level=QueryLevel.STUDY, limit=3)), timeout=10
        )
        assert len(matches) == 3 and done.truncated
        # ... and no transaction of the cancelled query is left open.
        idle = await db_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in%'"
        )
        assert idle == 0


async def test_metrics_count_queries_by_level(db_pool: asyncpg.Pool, service: Service) -> None:
    await index(db_pool, [dataset("1.4", "1.4.1", "1.4.1.1"), dataset("1.5", "1.5.1", "1.5.1.1")])
    await find_all(service.client, QueryRequest(level=QueryLevel.STUDY))
    await service.client.retrieve(
        RetrieveRequest(level=QueryLevel.STUDY, identifier={"0020000D": {"vr": "UI", "Value": ["1.4"]}})
    )
    labels = {"endpoint": "query", "level": "STUDY"}
    assert service.registry.get_sample_value("pacs_query_duration_seconds_count", labels) == 1
    assert service.registry.get_sample_value("pacs_query_matches_total", labels) == 2
    retrieve = {"endpoint": "retrieve", "level": "STUDY"}
    assert service.registry.get_sample_value("pacs_query_matches_total", retrieve) == 1
