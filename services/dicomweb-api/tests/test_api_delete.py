"""``DELETE /api/v1/studies|series|instances/{uid}``: index rows and stored
objects go, through the DICOMweb DELETE's deletion; only with DELETE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from dicomweb_api.testing import Store, StoredInstance
from pacs_common import locks
from pacs_common.storage import ObjectStorage
from query_service.testing import dataset

ADMIN = {"x-test-roles": "administrator"}


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app (conftest's ``dicomweb_app``) under /api/v1, sending no credentials unless told."""
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        yield http


@pytest.fixture
async def stored(store: Store) -> list[StoredInstance]:
    """Study 1.1: series 1.1.1 (two instances) and 1.1.2 (one); study 1.2: one."""
    return await store(
        [
            dataset("1.1", "1.1.1", "1.1.1.1"),
            dataset("1.1", "1.1.1", "1.1.1.2"),
            dataset("1.1", "1.1.2", "1.1.2.1"),
            dataset("1.2", "1.2.1", "1.2.1.1", patient_id="P2"),
        ]
    )


async def _exists(storage: ObjectStorage, instance: StoredInstance) -> bool:
    return await asyncio.to_thread(storage.exists, instance.location.key)


async def _sops(pool: asyncpg.Pool) -> list[str]:
    return [
        r["sop_instance_uid"] for r in await pool.fetch("SELECT sop_instance_uid FROM instance ORDER BY 1")
    ]


async def test_delete_needs_the_delete_permission(
    client: httpx.AsyncClient, stored: list[StoredInstance]
) -> None:
    assert (await client.delete("/studies/1.1")).status_code == 401
    for roles in ("viewer", "technologist", "radiologist"):
        assert (await client.delete("/studies/1.1", headers={"x-test-roles": roles})).status_code == 403
    assert (await client.get("/studies/1.1", headers=ADMIN)).status_code == 200


async def test_delete_a_study(
    client: httpx.AsyncClient, stored: list[StoredInstance], db_pool: asyncpg.Pool, hot_storage: ObjectStorage
) -> None:
    response = await client.delete("/studies/1.1", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "level": "study",
        "study_instance_uid": "1.1",
        "series_instance_uid": None,
        "sop_instance_uid": None,
        "instances_deleted": 3,
        "objects_deleted": 3,
        "objects_not_deleted": 0,
    }
    assert await _sops(db_pool) == ["1.2.1.1"]
    assert [await _exists(hot_storage, s) for s in stored] == [False, False, False, True]
    assert (await client.get("/studies/1.1", headers=ADMIN)).status_code == 404
    assert (await client.delete("/studies/1.1", headers=ADMIN)).status_code == 404


async def test_delete_a_series_keeps_the_rest_of_the_study(
    client: httpx.AsyncClient, stored: list[StoredInstance], db_pool: asyncpg.Pool, hot_storage: ObjectStorage
) -> None:
    response = await client.delete("/series/1.1.1", headers=ADMIN)
    assert response.status_code == 200
    assert (response.json()["study_instance_uid"], response.json()["instances_deleted"]) == ("1.1", 2)
    assert await _sops(db_pool) == ["1.1.2.1", "1.2.1.1"]
    assert not await _exists(hot_storage, stored[0])
    study = (await client.get("/studies/1.1", headers=ADMIN)).json()
    assert (study["number_of_series"], study["number_of_instances"]) == (1, 1)


async def test_delete_an_instance(
    client: httpx.AsyncClient, stored: list[StoredInstance], db_pool: asyncpg.Pool, hot_storage: ObjectStorage
) -> None:
    response = await client.delete("/instances/1.1.1.2", headers=ADMIN)
    assert response.status_code == 200
    body = response.json()
    assert (body["series_instance_uid"], body["sop_instance_uid"], body["objects_deleted"]) == (
        "1.1.1",
        "1.1.1.2",
        1,
    )
    assert await _sops(db_pool) == ["1.1.1.1", "1.1.2.1", "1.2.1.1"]
    assert [await _exists(hot_storage, s) for s in stored] == [True, False, True, True]
    series = (await client.get("/series/1.1.1", headers=ADMIN)).json()
    assert series["number_of_instances"] == 1


@pytest.mark.parametrize(
    ("path", "status"), [("/series/9.9", 404), ("/instances/9.9", 404), ("/studies/x", 422)]
)
async def test_delete_unknown_or_bad_uid(
    client: httpx.AsyncClient, stored: list[StoredInstance], db_pool: asyncpg.Pool, path: str, status: int
) -> None:
    assert (await client.delete(path, headers=ADMIN)).status_code == status
    assert len(await _sops(db_pool)) == 4


async def test_a_study_locked_by_someone_else_is_not_deleted(
    client: httpx.AsyncClient, stored: list[StoredInstance], db_pool: asyncpg.Pool, hot_storage: ObjectStorage
) -> None:
    async with db_pool.acquire() as connection:
        lock = await locks.acquire(
            connection, "1.1", "migration-job", mode=locks.LockMode.EXCLUSIVE, ttl_seconds=60
        )
    refused = await client.delete("/series/1.1.1", headers=ADMIN)
    assert refused.status_code == 409
    assert "locked" in refused.json()["detail"]
    assert (await client.delete("http://test/dicom-web/studies/1.1", headers=ADMIN)).status_code == 409
    assert await _sops(db_pool) == ["1.1.1.1", "1.1.1.2", "1.1.2.1", "1.2.1.1"]
    assert all([await _exists(hot_storage, s) for s in stored])

    async with db_pool.acquire() as connection:
        await locks.release(connection, "1.1", lock.id, "migration-job")
    assert (await client.delete("/studies/1.1", headers=ADMIN)).status_code == 200
