"""``/api/v1/nodes``: the AE registry over REST, and C-ECHO against a real
DCMTK storescp and against a closed port."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.nodes import RemoteNodeRepository

ADMIN = {"x-test-roles": "administrator"}
STORESCP = Path("/usr/bin/storescp")
STORESCP_AE = "STORESCP"


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app (conftest's ``dicomweb_app``) under /api/v1, sending no credentials unless told."""
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        yield http


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_for_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


@pytest.fixture
async def storescp(tmp_path: Path) -> AsyncIterator[int]:
    """DCMTK storescp answering as STORESCP; yields its port."""
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        str(STORESCP), "-aet", STORESCP_AE, "-od", str(tmp_path), str(port),
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_for_port(port)
        yield port
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)


def _node(ae_title: str = "ORTHANC", **fields: object) -> dict[str, object]:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": 4242, **fields}


async def test_nodes_need_the_admin_permission(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nodes")).status_code == 401
    for roles in ("viewer", "technologist", "radiologist"):
        assert (await client.get("/nodes", headers={"x-test-roles": roles})).status_code == 403
    assert (await client.post("/nodes/X/echo", headers={"x-test-roles": "viewer"})).status_code == 403


async def test_crud(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    created = await client.post(
        "/nodes", json=_node(description="remote PACS", allowed_operations=["store", "echo"]), headers=ADMIN
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["ae_title"] == "ORTHANC"
    assert body["allowed_operations"] == ["echo", "store"]
    assert body["created_at"]

    assert (await client.get("/nodes/ORTHANC", headers=ADMIN)).json()["description"] == "remote PACS"
    listed = (await client.get("/nodes", headers=ADMIN)).json()
    assert [n["ae_title"] for n in listed] == ["ORTHANC"]

    changed = await client.put("/nodes/ORTHANC", json={"port": 11112, "tls": True}, headers=ADMIN)
    assert changed.status_code == 200
    assert (changed.json()["port"], changed.json()["tls"], changed.json()["host"]) == (
        11112,
        True,
        "127.0.0.1",
    )
    stored = await RemoteNodeRepository(db_pool).get("ORTHANC")
    assert stored is not None
    assert stored.port == 11112

    assert (await client.delete("/nodes/ORTHANC", headers=ADMIN)).status_code == 204
    assert await RemoteNodeRepository(db_pool).get("ORTHANC") is None
    assert (await client.get("/nodes/ORTHANC", headers=ADMIN)).status_code == 404


async def test_duplicate_and_missing_nodes(client: httpx.AsyncClient) -> None:
    assert (await client.post("/nodes", json=_node(), headers=ADMIN)).status_code == 201
    duplicate = await client.post("/nodes", json=_node(), headers=ADMIN)
    assert duplicate.status_code == 409
    assert "exists" in duplicate.json()["detail"]
    assert (await client.put("/nodes/NOPE", json={"port": 1}, headers=ADMIN)).status_code == 404
    assert (await client.delete("/nodes/NOPE", headers=ADMIN)).status_code == 404
    assert (await client.post("/nodes/NOPE/echo", headers=ADMIN)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"host": "127.0.0.1", "port": 104},
        _node(port=0),
        _node(port=70000),
        _node(ae_title="A" * 17),
        _node(ae_title="BAD\\AE"),
        _node(allowed_operations=["teleport"]),
        _node(colour="blue"),
    ],
)
async def test_bad_bodies_are_422(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    response = await client.post("/nodes", json=body, headers=ADMIN)
    assert response.status_code == 422
    assert (await client.get("/nodes", headers=ADMIN)).json() == []


async def test_bad_update_is_422(client: httpx.AsyncClient) -> None:
    assert (await client.post("/nodes", json=_node(), headers=ADMIN)).status_code == 201
    assert (await client.put("/nodes/ORTHANC", json={"port": "x"}, headers=ADMIN)).status_code == 422
    assert (await client.put("/nodes/ORTHANC", json={"ae_title": "X"}, headers=ADMIN)).status_code == 422


@pytest.mark.skipif(not STORESCP.exists(), reason="DCMTK storescp not installed")
async def test_echo_a_running_storescp(client: httpx.AsyncClient, storescp: int) -> None:
    node = _node(STORESCP_AE, port=storescp)
    assert (await client.post("/nodes", json=node, headers=ADMIN)).status_code == 201
    response = await client.post(
        f"/nodes/{STORESCP_AE}/echo", json={"calling_ae_title": "RESTTEST"}, headers=ADMIN
    )
    assert response.status_code == 200
    result = response.json()
    assert result["success"] is True, result
    assert "0x0000" in result["message"]
    assert result["calling_ae_title"] == "RESTTEST"
    assert (result["ae_title"], result["port"]) == (STORESCP_AE, storescp)
    assert 0 < result["round_trip_ms"] < 10_000


async def test_echo_a_closed_port_fails(client: httpx.AsyncClient) -> None:
    node = _node("GONE", port=_free_port())
    assert (await client.post("/nodes", json=node, headers=ADMIN)).status_code == 201
    response = await client.post("/nodes/GONE/echo", headers=ADMIN)  # no body: the defaults
    assert response.status_code == 200
    result = response.json()
    assert result["success"] is False
    assert "no association" in result["message"]
    assert result["round_trip_ms"] >= 0


async def test_echo_options_are_validated(client: httpx.AsyncClient) -> None:
    assert (await client.post("/nodes", json=_node(), headers=ADMIN)).status_code == 201
    bad = await client.post("/nodes/ORTHANC/echo", json={"timeout_seconds": 0}, headers=ADMIN)
    assert bad.status_code == 422
