"""Instance availability and its series/study aggregates (pacs_common.hsm.availability)."""

from __future__ import annotations

import asyncpg
import pytest

from pacs_common.hsm.availability import set_availability
from pacs_common.hsm.testing import seed_instances
from pacs_common.storage.filesystem import FilesystemStorage


async def _levels(pool: asyncpg.Pool, study_uid: str) -> tuple[str, dict[str, str], dict[int, str]]:
    study = await pool.fetchval("SELECT availability FROM study WHERE study_instance_uid = $1", study_uid)
    series = await pool.fetch(
        """
        SELECT se.series_instance_uid, se.availability FROM series se
        JOIN study st ON st.pk = se.study_fk WHERE st.study_instance_uid = $1
        """,
        study_uid,
    )
    instances = await pool.fetch(
        """
        SELECT i.pk, i.availability FROM instance i JOIN series se ON se.pk = i.series_fk
        JOIN study st ON st.pk = se.study_fk WHERE st.study_instance_uid = $1
        """,
        study_uid,
    )
    return (
        str(study),
        {r["series_instance_uid"]: r["availability"] for r in series},
        {int(r["pk"]): r["availability"] for r in instances},
    )


async def test_least_available_instance_decides(db_pool: asyncpg.Pool, fs_storage: FilesystemStorage) -> None:
    seeded = await seed_instances(db_pool, fs_storage, series_per_study=2, instances_per_series=2)
    study_uid = seeded[0].study_instance_uid
    first_series = [s for s in seeded if s.series_instance_uid == seeded[0].series_instance_uid]
    other_series = [s for s in seeded if s.series_instance_uid != seeded[0].series_instance_uid]

    async with db_pool.acquire() as connection:
        await set_availability(connection, [first_series[0].pk], "NEARLINE")
    study, series, instances = await _levels(db_pool, study_uid)
    assert study == "NEARLINE"
    assert series[first_series[0].series_instance_uid] == "NEARLINE"
    assert series[other_series[0].series_instance_uid] == "ONLINE"
    assert instances[first_series[0].pk] == "NEARLINE"
    assert instances[first_series[1].pk] == "ONLINE"

    async with db_pool.acquire() as connection:
        await set_availability(connection, [other_series[1].pk], "OFFLINE")
    study, series, _ = await _levels(db_pool, study_uid)
    assert study == "OFFLINE"
    assert series[other_series[0].series_instance_uid] == "OFFLINE"

    # Back online, instance by instance: the aggregates follow.
    async with db_pool.acquire() as connection:
        await set_availability(connection, [s.pk for s in seeded], "ONLINE")
    study, series, instances = await _levels(db_pool, study_uid)
    assert study == "ONLINE"
    assert set(series.values()) == {"ONLINE"}
    assert set(instances.values()) == {"ONLINE"}


async def test_inside_the_callers_transaction(db_pool: asyncpg.Pool, fs_storage: FilesystemStorage) -> None:
    seeded = await seed_instances(db_pool, fs_storage, instances_per_series=2)
    async with db_pool.acquire() as connection:
        with pytest.raises(RuntimeError):
            async with connection.transaction():
                await set_availability(connection, [seeded[0].pk], "NEARLINE")
                raise RuntimeError("rolled back")
        await set_availability(connection, [], "NEARLINE")  # nothing to do
    study, _, _ = await _levels(db_pool, seeded[0].study_instance_uid)
    assert study == "ONLINE"


async def test_unknown_value_is_refused(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as connection:
        with pytest.raises(ValueError, match="LOST"):
            await set_availability(connection, [1], "LOST")
