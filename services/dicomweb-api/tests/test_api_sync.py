"""``/api/v1/sync-relations`` against the real index: add (the remote must be
a registered node; validated), list, show, ask for a run, history and
conflicts, remove; administrators only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.nodes import RemoteNodeCreate, RemoteNodeRepository
from pacs_common.sync import RunCounts, RunState, SyncRepository

ADMIN = {"x-test-roles": "administrator"}


@pytest.fixture
async def client(dicomweb_app: FastAPI, db_pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    await RemoteNodeRepository(db_pool).add(RemoteNodeCreate(ae_title="ORTHANC", host="127.0.0.1", port=4242))
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1", headers=ADMIN) as http:
        yield http


async def test_add_list_show_run_and_remove(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    body = {
        "name": "to-orthanc",
        "remote_ae_title": "ORTHANC",
        "direction": "both",
        "filter": {"modalities": ["ct"], "study_date_from": "20240101"},
        "schedule_kind": "interval",
        "interval_seconds": 600,
        "conflict_policy": "keep-local",
    }
    response = await client.post("/sync-relations", json=body)
    assert response.status_code == 201, response.text
    added = response.json()
    assert (added["direction"], added["filter"]["modalities"], added["next_run_at"] is not None) == (
        "both",
        ["CT"],
        True,
    )
    assert (await client.post("/sync-relations", json=body)).status_code == 409
    for bad in (
        {**body, "name": "x", "remote_ae_title": "NOBODY"},
        {**body, "name": "y", "schedule_kind": "cron"},
        {**body, "name": "z", "direction": "sideways"},
    ):
        assert (await client.post("/sync-relations", json=bad)).status_code == 422, bad
    assert [r["name"] for r in (await client.get("/sync-relations")).json()] == ["to-orthanc"]
    assert (await client.get("/sync-relations/to-orthanc")).json()["conflict_policy"] == "keep-local"
    assert (await client.get("/sync-relations/nope")).status_code == 404

    ran = await client.post("/sync-relations/to-orthanc/run")
    assert ran.status_code == 202 and ran.json()["run_requested_at"] is not None
    assert (await client.post("/sync-relations/nope/run")).status_code == 404

    # A replica ran it.
    repo = SyncRepository(db_pool)
    claim = await repo.claim(60)
    assert claim is not None
    await repo.finish(claim, RunState.PARTIAL, RunCounts(instances_pushed=2, instances_failed=1), error="x")
    [run] = (await client.get("/sync-relations/to-orthanc/runs")).json()
    assert (run["state"], run["trigger"], run["instances_pushed"], run["instances_failed"]) == (
        "partial",
        "manual",
        2,
        1,
    )
    assert (await client.get("/sync-relations/to-orthanc/conflicts")).json() == []
    assert (await client.get("/sync-relations/nope/runs")).status_code == 404

    assert (await client.delete("/sync-relations/to-orthanc")).status_code == 204
    assert (await client.delete("/sync-relations/to-orthanc")).status_code == 404


async def test_not_for_other_roles(client: httpx.AsyncClient) -> None:
    for roles in ("viewer", "technologist"):
        headers = {"x-test-roles": roles}
        assert (await client.get("/sync-relations", headers=headers)).status_code == 403
        assert (await client.post("/sync-relations/any/run", headers=headers)).status_code == 403
