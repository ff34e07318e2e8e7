"""The administrators' work resources against the real index:
``/api/v1/jobs`` (listing with filters and paging, cancel and retry with
their state rules, and the worker's side of ``pacs_common.jobs`` that puts
jobs in those states) and ``/api/v1/routing-rules`` (CRUD, destinations
checked against the node registry, the rules' matching)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.jobs import JobKind, JobRepository, JobState
from pacs_common.nodes import Operation, RemoteNodeCreate, RemoteNodeRepository
from pacs_common.routing import RoutingCondition, RoutingRule

ADMIN = {"x-test-roles": "administrator"}


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1", headers=ADMIN) as http:
        yield http


@pytest.fixture
def jobs(db_pool: asyncpg.Pool) -> JobRepository:
    return JobRepository(db_pool)


async def test_list_filters_and_pages_newest_first(client: httpx.AsyncClient, jobs: JobRepository) -> None:
    move = await jobs.create(JobKind.MOVE, {"study": "1.2", "destination": "ORTHANC"}, created_by="alice")
    prefetch = await jobs.create(JobKind.PREFETCH, {"patient_id": "P1"})
    ai = await jobs.create(JobKind.AI)
    claimed = await jobs.claim(frozenset({JobKind.MOVE}))
    assert claimed is not None and claimed.id == move.id

    response = await client.get("/jobs")
    assert response.status_code == 200
    body = response.json()
    assert (body["total"], response.headers["x-total-count"]) == (3, "3")
    assert [j["id"] for j in body["items"]] == [ai.id, prefetch.id, move.id]
    first = body["items"][2]
    assert (first["kind"], first["state"], first["params"]["destination"], first["attempts"]) == (
        "move", "running", "ORTHANC", 1
    )  # fmt: skip
    queued = (await client.get("/jobs", params={"state": "queued"})).json()
    assert [j["id"] for j in queued["items"]] == [ai.id, prefetch.id]
    some = (await client.get("/jobs", params=[("kind", "move"), ("kind", "ai")])).json()
    assert {j["id"] for j in some["items"]} == {move.id, ai.id}
    page = (await client.get("/jobs", params={"limit": 1, "offset": 1})).json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)
    assert [j["id"] for j in page["items"]] == [prefetch.id]
    for bad in ({"kind": "coffee"}, {"state": "sleeping"}, {"limit": 0}, {"offset": -1}):
        assert (await client.get("/jobs", params=bad)).status_code == 422


async def test_detail_with_progress(client: httpx.AsyncClient, jobs: JobRepository) -> None:
    job = await jobs.create(JobKind.MIGRATION, {"tier": "cold"})
    await jobs.claim(frozenset({JobKind.MIGRATION}))
    assert await jobs.report_progress(job.id, 40, 200)
    detail = (await client.get(f"/jobs/{job.id}")).json()
    assert (detail["progress_done"], detail["progress_total"], detail["state"]) == (40, 200, "running")
    assert detail["started_at"] is not None
    assert (await client.get("/jobs/999999")).status_code == 404
    assert (await client.get("/jobs/x")).status_code == 422


async def test_cancel_stops_the_worker_and_retry_requeues(
    client: httpx.AsyncClient, jobs: JobRepository
) -> None:
    job = await jobs.create(JobKind.EXPORT)
    await jobs.claim(frozenset({JobKind.EXPORT}))
    await jobs.report_progress(job.id, 3, 10)
    cancelled = await client.post(f"/jobs/{job.id}/cancel")
    assert cancelled.status_code == 200
    assert (cancelled.json()["state"], cancelled.json()["finished_at"] is not None) == ("cancelled", True)
    # The worker learns at its next report, and cannot finish the job any more.
    assert not await jobs.report_progress(job.id, 4)
    assert (await client.post(f"/jobs/{job.id}/cancel")).status_code == 409
    retried = (await client.post(f"/jobs/{job.id}/retry")).json()
    assert (retried["state"], retried["progress_done"], retried["progress_total"], retried["finished_at"]) == (
        "queued", 0, None, None
    )  # fmt: skip
    again = await jobs.claim(frozenset({JobKind.EXPORT}))
    assert again is not None and again.attempts == 2
    assert (await client.post(f"/jobs/{job.id}/retry")).status_code == 409  # running
    failed = await jobs.fail(job.id, "ORTHANC refused the association")
    assert failed.state is JobState.FAILED
    shown = (await client.get(f"/jobs/{job.id}")).json()
    assert shown["error"] == "ORTHANC refused the association"
    assert (await client.post(f"/jobs/{job.id}/cancel")).status_code == 409
    requeued = (await client.post(f"/jobs/{job.id}/retry")).json()
    assert (requeued["state"], requeued["error"]) == ("queued", None)
    assert (await client.post("/jobs/999999/retry")).status_code == 404
    assert (await client.post("/jobs/999999/cancel")).status_code == 404


async def test_done_jobs_stay_done(client: httpx.AsyncClient, jobs: JobRepository) -> None:
    job = await jobs.create(JobKind.AI)
    await jobs.claim(frozenset({JobKind.AI}))
    assert (await jobs.complete(job.id)).state is JobState.DONE
    assert (await client.post(f"/jobs/{job.id}/cancel")).status_code == 409
    assert (await client.post(f"/jobs/{job.id}/retry")).status_code == 409
    # A queued job can be cancelled before any worker took it.
    queued = await jobs.create(JobKind.AI)
    assert (await client.post(f"/jobs/{queued.id}/cancel")).json()["state"] == "cancelled"
    assert await jobs.claim(frozenset({JobKind.AI})) is None


async def test_workers_claim_different_jobs(jobs: JobRepository) -> None:
    for _ in range(5):
        await jobs.create(JobKind.PREFETCH)
    claimed = await asyncio.gather(*(jobs.claim(frozenset({JobKind.PREFETCH})) for _ in range(7)))
    ids = [job.id for job in claimed if job is not None]
    assert len(ids) == len(set(ids)) == 5


async def test_jobs_need_the_admin_permission(client: httpx.AsyncClient, jobs: JobRepository) -> None:
    job = await jobs.create(JobKind.MOVE)
    for roles in ("viewer", "technologist", "radiologist"):
        headers = {"x-test-roles": roles}
        assert (await client.get("/jobs", headers=headers)).status_code == 403
        assert (await client.post(f"/jobs/{job.id}/cancel", headers=headers)).status_code == 403


# -- routing rules -------------------------------------------------------------


@pytest.fixture
async def nodes(db_pool: asyncpg.Pool) -> None:
    repository = RemoteNodeRepository(db_pool)
    await repository.add(RemoteNodeCreate(ae_title="ORTHANC", host="127.0.0.1", port=4242))
    await repository.add(RemoteNodeCreate(ae_title="AI_NODE", host="127.0.0.1", port=11112))
    await repository.add(
        RemoteNodeCreate(
            ae_title="FINDONLY",
            host="127.0.0.1",
            port=104,
            allowed_operations=(Operation.ECHO, Operation.FIND),
        )
    )


CT_TO_ORTHANC = {
    "name": "CT to Orthanc",
    "priority": 20,
    "condition": {"modality": "CT", "study_description": "*chest*"},
    "destinations": [" ORTHANC", "ORTHANC ", "AI_NODE"],
}


async def test_routing_rules_crud(client: httpx.AsyncClient, nodes: None) -> None:
    created = await client.post("/routing-rules", json=CT_TO_ORTHANC)
    assert created.status_code == 201, created.text
    rule = created.json()
    assert (rule["enabled"], rule["trigger"], rule["destinations"], rule["condition"]) == (
        True, "instance.stored", ["ORTHANC", "AI_NODE"],
        {"modality": "CT", "calling_ae_title": None, "study_description": "*chest*", "sop_class_uid": None,
         "body_part_examined": None},
    )  # fmt: skip
    first = await client.post(
        "/routing-rules",
        json={"name": "all to AI", "priority": 10, "destinations": ["AI_NODE"], "enabled": False},
    )
    assert first.status_code == 201
    assert [r["name"] for r in (await client.get("/routing-rules")).json()] == ["all to AI", "CT to Orthanc"]
    assert (await client.post("/routing-rules", json=CT_TO_ORTHANC)).status_code == 409

    url = f"/routing-rules/{rule['id']}"
    assert (await client.get(url)).json() == rule
    changed = {**CT_TO_ORTHANC, "priority": 5, "condition": {"calling_ae_title": "MODALITY1"}}
    replaced = (await client.put(url, json=changed)).json()
    assert (replaced["priority"], replaced["condition"]["calling_ae_title"], replaced["condition"]["modality"]) == (
        5, "MODALITY1", None
    )  # fmt: skip
    assert replaced["updated_at"] > rule["updated_at"]
    assert (await client.put(url, json={**changed, "name": "all to AI"})).status_code == 409
    assert (await client.put("/routing-rules/999999", json=changed)).status_code == 404
    assert (await client.delete(url)).status_code == 204
    assert (await client.delete(url)).status_code == 404
    assert (await client.get(url)).status_code == 404


async def test_routing_rules_on_stable_studies_with_sop_class_and_body_part(
    client: httpx.AsyncClient, nodes: None
) -> None:
    body = {
        "name": "stable chest CT",
        "trigger": "study.stable",
        "condition": {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "body_part_examined": " chest"},
        "destinations": ["ORTHANC"],
    }
    created = await client.post("/routing-rules", json=body)
    assert created.status_code == 201, created.text
    rule = created.json()
    assert (rule["trigger"], rule["condition"]["sop_class_uid"], rule["condition"]["body_part_examined"]) == (
        "study.stable", "1.2.840.10008.5.1.4.1.1.2", "CHEST"
    )  # fmt: skip
    await client.post("/routing-rules", json={**CT_TO_ORTHANC, "destinations": ["ORTHANC"]})
    stable = (await client.get("/routing-rules", params={"trigger": "study.stable"})).json()
    assert [r["name"] for r in stable] == ["stable chest CT"]
    stored = (await client.get("/routing-rules", params={"trigger": "instance.stored"})).json()
    assert [r["name"] for r in stored] == ["CT to Orthanc"]
    changed = {**body, "trigger": "instance.stored", "condition": {"body_part_examined": "HEAD"}}
    replaced = (await client.put(f"/routing-rules/{rule['id']}", json=changed)).json()
    assert (replaced["trigger"], replaced["condition"]["sop_class_uid"], replaced["condition"]["body_part_examined"]) == (
        "instance.stored", None, "HEAD"
    )  # fmt: skip
    for bad in (
        {**body, "trigger": "study.created"},
        {**body, "condition": {"sop_class_uid": "1.2.x"}},
        {**body, "condition": {"body_part_examined": "CHEST/ABDOMEN"}},
    ):
        assert (await client.post("/routing-rules", json={**bad, "name": "bad"})).status_code == 422, bad


async def test_routing_rules_destinations_and_bodies_are_checked(
    client: httpx.AsyncClient, nodes: None
) -> None:
    unknown = await client.post(
        "/routing-rules", json={**CT_TO_ORTHANC, "destinations": ["ORTHANC", "NOBODY"]}
    )
    assert unknown.status_code == 422
    assert "NOBODY" in unknown.json()["detail"]
    # A node that may not receive instances is no destination.
    assert (
        await client.post("/routing-rules", json={**CT_TO_ORTHANC, "destinations": ["FINDONLY"]})
    ).status_code == 422
    bad_bodies = [
        {**CT_TO_ORTHANC, "destinations": []},
        {**CT_TO_ORTHANC, "destinations": ["A\\B"]},
        {**CT_TO_ORTHANC, "condition": {"modality": "ct!"}},
        {**CT_TO_ORTHANC, "condition": {"station": "X"}},
        {**CT_TO_ORTHANC, "name": ""},
        {**CT_TO_ORTHANC, "priority": -1},
    ]
    for body in bad_bodies:
        assert (await client.post("/routing-rules", json=body)).status_code == 422, body
    assert (await client.get("/routing-rules")).json() == []
    assert (await client.get("/routing-rules", headers={"x-test-roles": "technologist"})).status_code == 403


async def test_forwarding_queues_per_destination(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    assert (await client.get("/routing-rules/queues")).json() == []
    await db_pool.execute(
        """
        INSERT INTO forward_item (destination, study_instance_uid, sop_instance_uid, content_sha256, state,
                                  attempts, last_error, claim_token, finished_at)
        VALUES ('ORTHANC', '1.2', '1.2.1', repeat('0', 64), 'done', 1, NULL, NULL, now()),
               ('ORTHANC', '1.2', '1.2.2', repeat('0', 64), 'queued', 2, 'no association with ORTHANC', NULL, NULL),
               ('ORTHANC', '1.2', '1.2.3', repeat('0', 64), 'sending', 1, NULL, gen_random_uuid(), NULL),
               ('AI_NODE', '1.2', '1.2.1', repeat('0', 64), 'failed', 3, 'C-STORE status 0xA700', NULL, now())
        """
    )
    queues = (await client.get("/routing-rules/queues")).json()
    assert [
        (q["destination"], q["queued"], q["sending"], q["done"], q["failed"], q["last_error"]) for q in queues
    ] == [
        ("AI_NODE", 0, 0, 0, 1, "C-STORE status 0xA700"),
        ("ORTHANC", 1, 1, 1, 0, "no association with ORTHANC"),
    ]
    assert queues[0]["next_attempt_at"] is None and queues[1]["next_attempt_at"] is not None
    assert (
        await client.get("/routing-rules/queues", headers={"x-test-roles": "technologist"})
    ).status_code == 403


def test_routing_rule_matching() -> None:
    rule = RoutingRule.model_validate(
        {
            **CT_TO_ORTHANC,
            "condition": RoutingCondition(
                modality="CT", calling_ae_title="CT1", study_description="CT ?HEST*"
            ),
            "id": 1,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        }
    )
    assert rule.matches(modality="CT", calling_ae_title="CT1", study_description="ct chest w/o contrast")
    assert not rule.matches(modality="MR", calling_ae_title="CT1", study_description="CT CHEST")
    assert not rule.matches(modality="CT", calling_ae_title="CT2", study_description="CT CHEST")
    assert not rule.matches(modality="CT", calling_ae_title="CT1", study_description="CT ABDOMEN")
    assert not rule.matches(modality="CT", calling_ae_title="CT1", study_description=None)
    anything = rule.model_copy(update={"condition": RoutingCondition()})
    assert anything.matches(modality=None, calling_ae_title=None, study_description=None)
    chest = rule.model_copy(
        update={
            "condition": RoutingCondition(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", body_part_examined="Chest"
            )
        }
    )
    ct_image = {"modality": "CT", "calling_ae_title": None, "study_description": None}
    assert chest.matches(**ct_image, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", body_part_examined="chest ")
    assert not chest.matches(
        **ct_image, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", body_part_examined="CHEST"
    )
    assert not chest.matches(**ct_image, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", body_part_examined="HEAD")
    assert not chest.matches(**ct_image)
