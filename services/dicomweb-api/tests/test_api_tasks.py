"""``/api/v1/tasks`` against the real index: list and show the scheduled
tasks, change schedule / params / pause switch (validated), pause, resume,
trigger, the run history; administrators only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.tasks import RunStatus, TaskKind, TaskRepository

ADMIN = {"x-test-roles": "administrator"}


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1", headers=ADMIN) as http:
        yield http


@pytest.fixture
async def tasks(db_pool: asyncpg.Pool) -> TaskRepository:
    repo = TaskRepository(db_pool)
    await repo.create("integrity", TaskKind.INTEGRITY, cron="0 2 * * *")
    await repo.create("retention", TaskKind.RETENTION, interval_seconds=86400, params={"rules": []})
    return repo


async def test_list_and_show(client: httpx.AsyncClient, tasks: TaskRepository) -> None:
    listed = (await client.get("/tasks")).json()
    assert [(t["name"], t["kind"], t["cron"], t["interval_seconds"]) for t in listed] == [
        ("integrity", "integrity", "0 2 * * *", None),
        ("retention", "retention", None, 86400),
    ]
    shown = (await client.get("/tasks/retention")).json()
    assert (shown["params"], shown["paused"], shown["last_run_status"]) == ({"rules": []}, False, None)
    assert (await client.get("/tasks/nope")).status_code == 404


async def test_patch_schedule_params_and_paused(client: httpx.AsyncClient, tasks: TaskRepository) -> None:
    response = await client.patch(
        "/tasks/retention",
        json={"cron": "15 3 * * *", "params": {"rules": [{"modality": "CR", "days": 3650}], "dry_run": True}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["cron"], body["interval_seconds"]) == ("15 3 * * *", None)
    assert body["params"] == {"rules": [{"modality": "CR", "days": 3650}], "dry_run": True}
    next_at = datetime.fromisoformat(body["next_run_at"])
    assert (next_at.hour, next_at.minute) == (3, 15)

    body = (await client.patch("/tasks/integrity", json={"interval_seconds": 300, "paused": True})).json()
    assert (body["cron"], body["interval_seconds"], body["paused"]) == (None, 300, True)

    for bad in (
        {"cron": "0 2 * * *", "interval_seconds": 60},
        {"cron": "not a cron at all"},
        {"interval_seconds": 0},
        {"params": {"rules": [{"modality": "CR"}]}},
        {"params": {"unknown": 1}},
        {"colour": "red"},
    ):
        response = await client.patch("/tasks/retention", json=bad)
        assert response.status_code == 422, bad
    assert (await client.patch("/tasks/nope", json={"paused": True})).status_code == 404
    # Nothing of the refused changes was kept.
    assert (await tasks.require("retention")).cron == "15 3 * * *"


async def test_pause_resume_trigger_and_runs(
    client: httpx.AsyncClient, tasks: TaskRepository, db_pool: asyncpg.Pool
) -> None:
    assert (await client.post("/tasks/integrity/pause")).json()["paused"] is True
    await db_pool.execute("UPDATE scheduled_task SET next_run_at = now() - interval '2 days'")
    resumed = (await client.post("/tasks/integrity/resume")).json()
    assert resumed["paused"] is False
    assert datetime.fromisoformat(resumed["next_run_at"]) > datetime.now(UTC)

    triggered = await client.post("/tasks/integrity/trigger")
    assert triggered.status_code == 202 and triggered.json()["trigger_requested"] is True
    assert (await client.post("/tasks/nope/trigger")).status_code == 404

    # A scheduler replica takes the triggered run.
    claim = await tasks.claim("replica-1", 30)
    assert claim is not None and claim.task.name == "integrity"
    await tasks.finish(claim, "replica-1", RunStatus.SUCCEEDED, summary={"checked": 7})
    runs = (await client.get("/tasks/integrity/runs")).json()
    assert [(r["status"], r["trigger"], r["runner_id"], r["summary"]) for r in runs] == [
        ("succeeded", "manual", "replica-1", {"checked": 7})
    ]
    shown = (await client.get("/tasks/integrity")).json()
    assert (shown["last_run_status"], shown["trigger_requested"]) == ("succeeded", False)
    assert datetime.fromisoformat(shown["last_success_at"]) > datetime.now(UTC) - timedelta(minutes=5)
    assert (await client.get("/tasks/integrity/runs", params={"limit": 0})).status_code == 422
    assert (await client.get("/tasks/nope/runs")).status_code == 404


async def test_only_administrators(client: httpx.AsyncClient, tasks: TaskRepository) -> None:
    for roles in ("viewer", "technologist"):
        headers = {"x-test-roles": roles}
        assert (await client.get("/tasks", headers=headers)).status_code == 403
        assert (await client.post("/tasks/integrity/trigger", headers=headers)).status_code == 403
        assert (
            await client.patch("/tasks/integrity", json={"paused": True}, headers=headers)
        ).status_code == 403
    assert not (await tasks.require("integrity")).trigger_requested
