"""``/api/v1/prefetch`` against the real index: an on-demand prefetch is
queued as a ``prefetch`` job the scheduler will run, with what was asked in
its params; technologists (workflow permission) and administrators may ask,
viewers may not; an unknown source is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from dicomweb_api.testing import ROLES_HEADER, SUBJECT_HEADER
from pacs_common.jobs import JobKind, JobRepository, JobState
from pacs_common.nodes import RemoteNodeCreate, RemoteNodeRepository


@pytest.fixture
async def api(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        yield http


def as_role(role: str, subject: str = "tester") -> dict[str, str]:
    return {ROLES_HEADER: role, SUBJECT_HEADER: subject}


async def test_technologist_queues_a_prefetch_job(api: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    await RemoteNodeRepository(db_pool).add(RemoteNodeCreate(ae_title="ORTHANC", host="127.0.0.1", port=4242))
    response = await api.post(
        "/prefetch",
        json={"patient_id": " P-42 ", "source": "ORTHANC", "modality": "ct"},
        headers=as_role("technologist", "tina"),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["kind"], body["state"], body["created_by"]) == ("prefetch", "queued", "tina")
    assert body["params"] == {
        "patient_id": "P-42",
        "source": "ORTHANC",
        "modality": "CT",
        "trigger": "on-demand",
    }
    job = await JobRepository(db_pool).get(body["id"])
    assert job is not None and job.kind is JobKind.PREFETCH and job.state is JobState.QUEUED

    shown = await api.get(f"/prefetch/{body['id']}", headers=as_role("technologist"))
    assert shown.status_code == 200 and shown.json()["id"] == body["id"]
    # The same job under /jobs, for administrators.
    assert (await api.get(f"/jobs/{body['id']}", headers=as_role("administrator"))).json()[
        "kind"
    ] == "prefetch"


async def test_without_source_every_configured_source_is_asked(
    api: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    response = await api.post("/prefetch", json={"patient_id": "P-1"}, headers=as_role("administrator"))
    assert response.status_code == 202
    assert response.json()["params"] == {"patient_id": "P-1", "trigger": "on-demand"}


async def test_refusals(api: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    viewer = await api.post("/prefetch", json={"patient_id": "P-1"}, headers=as_role("viewer"))
    assert viewer.status_code == 403
    assert (await api.post("/prefetch", json={"patient_id": "P-1"})).status_code == 401
    admin = as_role("administrator")
    unknown = await api.post("/prefetch", json={"patient_id": "P-1", "source": "NOWHERE"}, headers=admin)
    assert unknown.status_code == 422 and "NOWHERE" in unknown.text
    for bad in ({"patient_id": "  "}, {}, {"patient_id": "P", "extra": 1}, {"patient_id": "x" * 65}):
        assert (await api.post("/prefetch", json=bad, headers=admin)).status_code == 422
    other = await JobRepository(db_pool).create(JobKind.MIGRATION)
    assert (await api.get(f"/prefetch/{other.id}", headers=admin)).status_code == 404
    assert (await api.get("/prefetch/999999", headers=admin)).status_code == 404
    _, jobs = await JobRepository(db_pool).list(kinds=frozenset({JobKind.PREFETCH}))
    assert jobs == []
