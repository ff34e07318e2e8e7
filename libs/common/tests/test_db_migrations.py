"""Migrations against the real PostgreSQL: empty database to head, again,
down and up, several migrators at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import asyncpg
import pytest

from pacs_common.db.migrate import current_revision, downgrade, drop_database, head_revision, upgrade
from pacs_common.settings import DatabaseSettings
from pacs_common.testing.database import unique_database_settings

INDEX_TABLES = {
    "patient",
    "study",
    "series",
    "instance",
    "instance_location",
    "instance_metadata",
    "instance_superseded",
}


@pytest.fixture
def fresh_database() -> Iterator[DatabaseSettings]:
    """Settings naming a database that does not exist yet (dropped after)."""
    settings = unique_database_settings("pacs_migrate")
    try:
        yield settings
    finally:
        drop_database(settings)


async def _tables(settings: DatabaseSettings) -> set[str]:
    connection = await asyncpg.connect(settings.url)
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await connection.close()


async def _indexes(settings: DatabaseSettings) -> set[str]:
    connection = await asyncpg.connect(settings.url)
    try:
        rows = await connection.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        return {r["indexname"] for r in rows}
    finally:
        await connection.close()


def test_upgrade_creates_the_database_and_the_schema(fresh_database: DatabaseSettings) -> None:
    assert current_revision(fresh_database) is None
    upgrade(fresh_database)
    assert current_revision(fresh_database) == head_revision()
    tables = asyncio.run(_tables(fresh_database))
    assert tables >= INDEX_TABLES | {"alembic_version"}
    indexes = asyncio.run(_indexes(fresh_database))
    # Matching indexes the query service relies on (pg_trgm ships with Debian's PostgreSQL).
    assert {
        "patient_name_norm_pattern_idx",
        "patient_name_norm_trgm_idx",
        "study_accession_number_pattern_idx",
        "study_modalities_in_study_idx",
        "study_date_time_idx",
        "series_modality_idx",
        "study_stable_due_idx",
    } <= indexes


def test_upgrade_is_rerunnable_and_reversible(fresh_database: DatabaseSettings) -> None:
    upgrade(fresh_database)
    upgrade(fresh_database)  # at head: nothing to do
    assert current_revision(fresh_database) == head_revision()
    downgrade(fresh_database, "base")
    assert current_revision(fresh_database) is None
    assert not asyncio.run(_tables(fresh_database)) & INDEX_TABLES
    upgrade(fresh_database)
    assert current_revision(fresh_database) == head_revision()


def test_concurrent_migrators_take_turns(fresh_database: DatabaseSettings) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        try:
            barrier.wait()
            upgrade(fresh_database)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert current_revision(fresh_database) == head_revision()


async def test_upgrade_works_inside_a_running_event_loop(fresh_database: DatabaseSettings) -> None:
    # e.g. called from an async CLI or fixture: runs on a thread of its own
    upgrade(fresh_database)
    assert current_revision(fresh_database) == head_revision()


def test_current_revision_of_a_missing_database() -> None:
    settings = unique_database_settings("pacs_missing")
    assert current_revision(settings) is None
    drop_database(settings)  # dropping what does not exist is fine
