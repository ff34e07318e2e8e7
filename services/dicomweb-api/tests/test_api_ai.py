"""``/api/v1/ai``: AI rules (CRUD, validation, administrators only) and the
list of AI requests the connector created, against the real index."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.ai import AiRuleCreate, AiRuleRepository
from pacs_common.jobs import JobKind, JobRepository

ADMIN = {"x-test-roles": "administrator"}
RULE = {
    "name": "bone",
    "modality": "CT",
    "body_part_examined": "chest",
    "endpoint_url": "http://inference:8090/v1/infer",
    "timeout_seconds": 120,
    "max_attempts": 2,
    "headers": {"X-Model": "v2"},
    "secret_ref": "AI_BONE_TOKEN",
}


@pytest.fixture
async def api(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1", headers=ADMIN) as http:
        yield http


async def test_rule_crud(api: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    created = await api.post("/ai/rules", json=RULE)
    assert created.status_code == 201, created.text
    rule = created.json()
    assert (rule["name"], rule["modality"], rule["body_part_examined"]) == ("bone", "CT", "CHEST")
    assert (rule["enabled"], rule["sop_class_uid"], rule["max_attempts"]) == (True, None, 2)
    assert rule["headers"] == {"X-Model": "v2"}
    assert (await api.post("/ai/rules", json=RULE)).status_code == 409
    assert [r["id"] for r in (await api.get("/ai/rules")).json()] == [rule["id"]]
    assert (await api.get(f"/ai/rules/{rule['id']}")).json() == rule

    replaced = await api.put(
        f"/ai/rules/{rule['id']}",
        json={**RULE, "enabled": False, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "modality": None},
    )
    assert replaced.status_code == 200
    body = replaced.json()
    assert (body["enabled"], body["modality"], body["sop_class_uid"]) == (
        False,
        None,
        "1.2.840.10008.5.1.4.1.1.2",
    )
    stored = await AiRuleRepository(db_pool).get(rule["id"])
    assert stored is not None and not stored.enabled

    other = (await api.post("/ai/rules", json={**RULE, "name": "other"})).json()
    assert (await api.put(f"/ai/rules/{other['id']}", json=RULE)).status_code == 409
    assert (await api.put("/ai/rules/999999", json=RULE)).status_code == 404
    assert (await api.delete(f"/ai/rules/{rule['id']}")).status_code == 204
    assert (await api.delete(f"/ai/rules/{rule['id']}")).status_code == 404
    assert (await api.get(f"/ai/rules/{rule['id']}")).status_code == 404


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint_url": "ftp://x/y"},
        {"modality": "ct"},
        {"sop_class_uid": "not-a-uid"},
        {"timeout_seconds": 0},
        {"max_attempts": 0},
        {"headers": {"Authorization": "Bearer x"}},
        {"headers": {"X-Bad": "a\r\nInjected: b"}},
        {"secret_ref": "lower-case"},
        {"name": ""},
        {"surprise": 1},
    ],
)
async def test_invalid_rules_are_refused(api: httpx.AsyncClient, change: dict[str, object]) -> None:
    assert (await api.post("/ai/rules", json={**RULE, **change})).status_code == 422


async def test_only_administrators(dicomweb_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        assert (await http.get("/ai/rules")).status_code == 401
        viewer = {"x-test-roles": "radiologist"}
        assert (await http.get("/ai/rules", headers=viewer)).status_code == 403
        assert (await http.post("/ai/rules", json=RULE, headers=viewer)).status_code == 403
        assert (await http.get("/ai/requests", headers=viewer)).status_code == 403


async def test_requests_are_listed_with_filters(api: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    rules = AiRuleRepository(db_pool)
    bone = await rules.add(AiRuleCreate.model_validate(RULE))
    lung = await rules.add(AiRuleCreate.model_validate({**RULE, "name": "lung"}))
    job = await JobRepository(db_pool).create(JobKind.AI, {"rule": "bone"})
    await db_pool.execute(
        """
        INSERT INTO ai_request (rule_id, study_instance_uid, job_id, state, attempts, error, params,
                                result_sop_instance_uids)
        VALUES ($1, '1.2.3', $3, 'succeeded', 1, NULL, '{"series": ["1.2.3.1"]}', '{1.2.3.9, 1.2.3.10}'),
               ($2, '1.2.3', NULL, 'failed', 3, 'HTTP 500', '{}', '{}'),
               ($1, '1.2.4', NULL, 'queued', 0, NULL, '{}', '{}')
        """,
        bone.id,
        lung.id,
        job.id,
    )
    everything = await api.get("/ai/requests")
    assert everything.status_code == 200
    assert (everything.json()["total"], everything.headers["x-total-count"]) == (3, "3")
    [succeeded] = (await api.get("/ai/requests", params={"state": "succeeded"})).json()["items"]
    assert (succeeded["rule_name"], succeeded["job_id"], succeeded["attempts"]) == ("bone", job.id, 1)
    assert succeeded["series_instance_uids"] == ["1.2.3.1"]
    assert succeeded["result_sop_instance_uids"] == ["1.2.3.9", "1.2.3.10"]
    failed = (await api.get("/ai/requests", params={"rule_id": lung.id})).json()["items"]
    assert [(r["state"], r["error"]) for r in failed] == [("failed", "HTTP 500")]
    of_study = (await api.get("/ai/requests", params={"StudyInstanceUID": "1.2.4"})).json()
    assert [r["state"] for r in of_study["items"]] == ["queued"]
    page = (await api.get("/ai/requests", params={"limit": 1, "offset": 2})).json()
    assert (page["total"], len(page["items"])) == (3, 1)
    detail = await api.get(f"/ai/requests/{succeeded['id']}")
    assert detail.json() == succeeded
    assert (await api.get("/ai/requests/999999")).status_code == 404
    assert (await api.get("/ai/requests", params={"state": "sleeping"})).status_code == 422
    # Removing a rule removes its requests.
    assert (await api.delete(f"/ai/rules/{bone.id}")).status_code == 204
    assert (await api.get("/ai/requests")).json()["total"] == 1
