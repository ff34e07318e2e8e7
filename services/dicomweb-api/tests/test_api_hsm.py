"""``/api/v1/hsm``: queue migration jobs, list passes, tier statistics
(against the real index; the jobs are run by the hsm-migrator, tested there)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.hsm.testing import seed_instances
from pacs_common.jobs import JobKind, JobRepository, JobState
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage

ADMIN = {"x-test-roles": "administrator"}


@pytest.fixture
def storage_registry(fs_storage: FilesystemStorage, tmp_path: Path) -> StorageRegistry:
    return StorageRegistry({"hot": fs_storage, "warm": FilesystemStorage(tmp_path / "warm")})


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1", headers=ADMIN) as http:
        yield http


async def test_queue_a_migration_job(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    response = await client.post(
        "/hsm/runs", json={"from_tier": "hot", "to_tier": "WARM", "study_instance_uids": [study]}
    )
    assert response.status_code == 202
    job = response.json()
    assert (job["kind"], job["state"]) == ("migration", "queued")
    assert job["params"] == {
        "from_tier": "hot",
        "to_tier": "warm",
        "study_instance_uids": [study],
        "dry_run": False,
    }
    assert job["created_by"]
    stored = await JobRepository(db_pool).get(job["id"])
    assert stored is not None and (stored.kind, stored.state) == (JobKind.MIGRATION, JobState.QUEUED)
    # The policy rules, counting only; it shows under /jobs like any job.
    dry = (await client.post("/hsm/runs", json={"dry_run": True})).json()
    assert dry["params"] == {"dry_run": True}
    listed = (await client.get("/jobs", params={"kind": "migration"})).json()
    assert {j["id"] for j in listed["items"]} == {job["id"], dry["id"]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"to_tier": "tape"}, "unknown storage tier 'tape'"),
        ({"from_tier": "hot", "to_tier": "hot"}, "must differ"),
        ({"to_tier": "warm", "study_instance_uids": ["not a uid"]}, "not a UID"),
        ({"to_tier": "warm", "study_instance_uids": []}, ""),
        ({"to_tier": "warm", "everything": True}, ""),
    ],
)
async def test_invalid_runs_are_refused(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, body: dict[str, object], message: str
) -> None:
    response = await client.post("/hsm/runs", json=body)
    assert response.status_code == 422
    assert message in response.text
    assert await db_pool.fetchval("SELECT count(*) FROM job") == 0


async def test_tier_statistics_and_runs(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, fs_storage: FilesystemStorage
) -> None:
    empty = (await client.get("/hsm/tiers")).json()
    assert empty == [
        {"tier": "hot", "instances": 0, "bytes": 0, "configured": True},
        {"tier": "warm", "instances": 0, "bytes": 0, "configured": True},
    ]
    seeded = await seed_instances(db_pool, fs_storage, instances_per_series=3)
    await db_pool.execute("UPDATE instance_location SET tier = 'warm' WHERE instance_fk = $1", seeded[0].pk)
    await db_pool.execute("UPDATE instance_location SET tier = 'gone' WHERE instance_fk = $1", seeded[1].pk)
    tiers = {t["tier"]: t for t in (await client.get("/hsm/tiers")).json()}
    assert (tiers["hot"]["instances"], tiers["hot"]["bytes"]) == (1, seeded[2].size)
    assert (tiers["warm"]["instances"], tiers["warm"]["bytes"]) == (1, seeded[0].size)
    assert (tiers["gone"]["instances"], tiers["gone"]["configured"]) == (1, False)

    job = (await client.post("/hsm/runs", json={"to_tier": "warm"})).json()
    await db_pool.execute(
        """
        INSERT INTO hsm_run (trigger, job_id, owner, planned, moved, moved_bytes, finished_at)
        VALUES ('job', $1, 'replica', 2, 2, 100, now()), ('policy', NULL, 'replica', 0, 0, 0, now())
        """,
        job["id"],
    )
    runs = (await client.get("/hsm/runs")).json()
    assert len(runs) == 2
    only = (await client.get("/hsm/runs", params={"job_id": job["id"]})).json()
    assert [(r["trigger"], r["moved"], r["moved_bytes"]) for r in only] == [("job", 2, 100)]


async def test_administrators_only(client: httpx.AsyncClient) -> None:
    for roles in ("viewer", "technologist", "radiologist"):
        headers = {"x-test-roles": roles}
        assert (await client.post("/hsm/runs", json={}, headers=headers)).status_code == 403
        assert (await client.get("/hsm/tiers", headers=headers)).status_code == 403
        assert (await client.get("/hsm/runs", headers=headers)).status_code == 403
