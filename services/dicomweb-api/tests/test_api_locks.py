"""``/api/v1/studies/{uid}/lock``: exclusive and shared locks of several
holders, expiry, release, permissions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.testing import HeaderAuthenticator

STUDY = "1.2.3.4"


def _as(subject: str, roles: str = "technologist") -> dict[str, str]:
    return {"x-test-subject": subject, "x-test-roles": roles}


ALICE = _as("alice")
BOB = _as("bob")
ADMIN = _as("root", "administrator")


@pytest.fixture
async def client(api_context: ApiContext) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(api_context, HeaderAuthenticator(), CollectorRegistry())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        yield http


async def _lock(client: httpx.AsyncClient, who: dict[str, str], mode: str, ttl: int = 60) -> httpx.Response:
    return await client.post(f"/studies/{STUDY}/lock", json={"mode": mode, "ttl_seconds": ttl}, headers=who)


async def test_exclusive_lock_keeps_others_out(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"/studies/{STUDY}/lock", json={"mode": "exclusive", "ttl_seconds": 60, "reason": "QC"}, headers=ALICE
    )
    assert response.status_code == 201
    lock = response.json()
    assert (lock["holder"], lock["mode"], lock["reason"], lock["study_instance_uid"]) == (
        "alice", "exclusive", "QC", STUDY
    )  # fmt: skip
    for mode in ("exclusive", "shared"):
        refused = await _lock(client, BOB, mode)
        assert refused.status_code == 409
        assert "exclusive by alice" in refused.json()["detail"]
        assert [c["id"] for c in refused.json()["conflicting"]] == [lock["id"]]
    # The holder's own locks never conflict.
    assert (await _lock(client, ALICE, "shared")).status_code == 201
    # Another study is not locked.
    other = await client.post("/studies/9.9/lock", json={"mode": "exclusive"}, headers=BOB)
    assert other.status_code == 201


async def test_shared_locks_go_together_but_not_with_exclusive(client: httpx.AsyncClient) -> None:
    assert (await _lock(client, ALICE, "shared")).status_code == 201
    assert (await _lock(client, BOB, "shared")).status_code == 201
    refused = await _lock(client, _as("carol"), "exclusive")
    assert refused.status_code == 409
    assert len(refused.json()["conflicting"]) == 2
    listed = (await client.get(f"/studies/{STUDY}/locks", headers=ALICE)).json()
    assert [lock["holder"] for lock in listed] == ["alice", "bob"]


async def test_expired_locks_no_longer_count(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    lock = (await _lock(client, ALICE, "exclusive")).json()
    await db_pool.execute(
        "UPDATE study_lock SET acquired_at = now() - interval '2 min', expires_at = now() - interval '1 s'"
    )
    assert (await client.get(f"/studies/{STUDY}/locks", headers=ALICE)).json() == []
    assert (await _lock(client, BOB, "exclusive")).status_code == 201
    # The expired lock is gone, and cannot be released any more.
    assert (await client.delete(f"/studies/{STUDY}/lock/{lock['id']}", headers=ALICE)).status_code == 404
    assert await db_pool.fetchval("SELECT count(*) FROM study_lock") == 1


async def test_release_by_holder_or_administrator(client: httpx.AsyncClient) -> None:
    lock = (await _lock(client, ALICE, "exclusive")).json()
    url = f"/studies/{STUDY}/lock/{lock['id']}"
    assert (await client.delete(url, headers=BOB)).status_code == 403
    assert (await client.delete(f"/studies/9.9/lock/{lock['id']}", headers=ALICE)).status_code == 404
    assert (await client.delete(url, headers=ALICE)).status_code == 204
    assert (await client.delete(url, headers=ALICE)).status_code == 404
    assert (await _lock(client, BOB, "exclusive")).status_code == 201
    bobs = (await client.get(f"/studies/{STUDY}/locks", headers=BOB)).json()[0]
    assert (await client.delete(f"/studies/{STUDY}/lock/{bobs['id']}", headers=ADMIN)).status_code == 204
    assert (await client.get(f"/studies/{STUDY}/locks", headers=BOB)).json() == []


async def test_concurrent_exclusive_requests_grant_one(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(_lock(client, _as(f"user{n}"), "exclusive") for n in range(8)))
    assert sorted(r.status_code for r in responses) == [201] + [409] * 7


async def test_bad_requests_and_permissions(client: httpx.AsyncClient) -> None:
    assert (await _lock(client, ALICE, "exclusive", ttl=0)).status_code == 422
    assert (await _lock(client, ALICE, "exclusive", ttl=10**6)).status_code == 422
    assert (await _lock(client, ALICE, "forever")).status_code == 422
    assert (await client.post("/studies/x/lock", json={}, headers=ALICE)).status_code == 422
    assert (await client.post(f"/studies/{STUDY}/lock", json={})).status_code == 401
    assert (await _lock(client, _as("v", "viewer"), "shared")).status_code == 403
    assert (await client.get(f"/studies/{STUDY}/locks", headers=_as("r", "radiologist"))).status_code == 403
