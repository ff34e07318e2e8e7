"""``/api/v1/worklist`` and ``/api/v1/mpps``: items scheduled over REST are
what a modality's worklist C-FIND (the query-service) finds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pacs_common.messaging.models import MppsEvent
from pacs_common.query.models import WorklistQueryRequest
from pacs_common.workflow import mpps, worklist
from query_service.testing import Service

TECHNOLOGIST = {"x-test-roles": "technologist"}


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app (conftest's ``dicomweb_app``) under /api/v1, sending no credentials unless told."""
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        yield http


def _s(vr: str, value: str) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


ORDER: dict[str, Any] = {
    "patient_id": "P-77",
    "patient_name": "DOE^JANE",
    "patient_birth_date": "19800101",
    "patient_sex": "F",
    "accession_number": "ACC-77",
    "requested_procedure_description": "CT chest",
    "steps": [
        {
            "modality": "CT",
            "scheduled_station_ae_title": "CT01",
            "start_date": "20261124",
            "start_time": "0930",
            "description": "chest without contrast",
        }
    ],
}


async def test_worklist_needs_the_workflow_permission(client: httpx.AsyncClient) -> None:
    assert (await client.get("/worklist")).status_code == 401
    assert (await client.get("/worklist", headers={"x-test-roles": "viewer"})).status_code == 403
    assert (await client.get("/mpps", headers={"x-test-roles": "radiologist"})).status_code == 403
    assert (await client.get("/worklist", headers={"x-test-roles": "administrator"})).status_code == 200


async def test_schedule_get_list_and_remove(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    created = await client.post("/worklist", json=ORDER, headers=TECHNOLOGIST)
    assert created.status_code == 201, created.text
    [item] = created.json()
    assert (item["patient_id"], item["accession_number"], item["modality"]) == ("P-77", "ACC-77", "CT")
    assert item["sps_status"] == "SCHEDULED"
    assert item["sps_id"]  # generated
    assert item["study_instance_uid"]  # generated
    assert (item["sps_start_date"], item["sps_start_time"]) == ("20261124", "0930")

    stored = await worklist.get_item(db_pool, item["pk"])
    assert stored is not None
    assert stored.scheduled_station_ae_title == "CT01"

    fetched = await client.get(f"/worklist/{item['pk']}", headers=TECHNOLOGIST)
    assert fetched.json()["attributes"] == stored.attributes
    listed = (await client.get("/worklist", headers=TECHNOLOGIST)).json()
    assert [i["pk"] for i in listed] == [item["pk"]]
    assert (await client.get("/worklist?status=COMPLETED", headers=TECHNOLOGIST)).json() == []

    assert (await client.delete(f"/worklist/{item['pk']}", headers=TECHNOLOGIST)).status_code == 204
    assert await worklist.get_item(db_pool, item["pk"]) is None
    assert (await client.get(f"/worklist/{item['pk']}", headers=TECHNOLOGIST)).status_code == 404
    assert (await client.delete(f"/worklist/{item['pk']}", headers=TECHNOLOGIST)).status_code == 404


async def test_item_scheduled_over_rest_is_found_by_worklist_query(
    client: httpx.AsyncClient, query_service: Service
) -> None:
    assert (await client.post("/worklist", json=ORDER, headers=TECHNOLOGIST)).status_code == 201
    other = {**ORDER, "accession_number": "ACC-88", "steps": [{"modality": "MR"}]}
    assert (await client.post("/worklist", json=other, headers=TECHNOLOGIST)).status_code == 201
    identifier = {
        "00080050": {"vr": "SH"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "doe*"}]},
        "00400100": {"vr": "SQ", "Value": [{"00080060": _s("CS", "CT"), "00400001": {"vr": "AE"}}]},
    }
    stream = await query_service.client.worklist(WorklistQueryRequest(identifier=identifier))
    matches = [match async for match in stream]
    assert [m["00080050"]["Value"][0] for m in matches] == ["ACC-77"]
    assert matches[0]["00400100"]["Value"][0]["00400001"] == _s("AE", "CT01")


async def test_several_steps_and_dicom_json_attributes(client: httpx.AsyncClient) -> None:
    body = {
        "attributes": {
            "00100020": _s("LO", "FROM-JSON"),
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "ROE^RICHARD"}]},
            "00400100": {"vr": "SQ", "Value": [{"00400011": _s("SH", "Room 3")}]},
        },
        "accession_number": "ACC-99",
        "steps": [{"modality": "CT", "sps_id": "S1"}, {"modality": "PT", "sps_id": "S2"}],
    }
    created = await client.post("/worklist", json=body, headers=TECHNOLOGIST)
    assert created.status_code == 201, created.text
    items = created.json()
    assert [(i["sps_id"], i["modality"]) for i in items] == [("S1", "CT"), ("S2", "PT")]
    assert {i["patient_id"] for i in items} == {"FROM-JSON"}
    first_step = items[0]["attributes"]["00400100"]["Value"][0]
    assert first_step["00400011"] == _s("SH", "Room 3")  # kept from the given step
    assert len({i["study_instance_uid"] for i in items}) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"steps": [{"modality": "CT"}]},  # no patient
        {"patient_id": "P", "patient_birth_date": "1980-01-01"},
        {"patient_id": "P", "patient_sex": "X"},
        {"patient_id": "P", "steps": [{"start_time": "9am"}]},
        {"patient_id": "P", "study_instance_uid": "not.a.uid"},
        {"patient_id": "P", "unknown": 1},
        {"patient_id": "P", "attributes": {"00400100": {"vr": "SQ", "Value": ["text"]}}},
        {"patient_id": "P", "attributes": {"00100010": "not DICOM JSON"}},
    ],
)
async def test_bad_items_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post("/worklist", json=body, headers=TECHNOLOGIST)
    assert response.status_code == 422, response.text
    assert (await client.get("/worklist", headers=TECHNOLOGIST)).json() == []


async def test_bad_ids_are_422(client: httpx.AsyncClient) -> None:
    assert (await client.get("/worklist/abc", headers=TECHNOLOGIST)).status_code == 422
    assert (await client.get("/worklist/0", headers=TECHNOLOGIST)).status_code == 422
    assert (await client.get("/worklist?limit=0", headers=TECHNOLOGIST)).status_code == 422


async def _published(event: MppsEvent) -> None:
    return None


async def test_mpps_view(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    [item] = (await client.post("/worklist", json=ORDER, headers=TECHNOLOGIST)).json()
    attributes = {
        "00100020": _s("LO", "P-77"),
        "00400252": _s("CS", "IN PROGRESS"),
        "00400270": {"vr": "SQ", "Value": [{"00080050": _s("SH", "ACC-77")}]},
    }
    await mpps.create(db_pool, "1.2.9.1", attributes, calling_ae_title="CT01", publish=_published)
    await mpps.create(db_pool, "1.2.9.2", attributes, calling_ae_title="CT01", publish=_published)
    await mpps.update(db_pool, "1.2.9.2", {"00400252": _s("CS", "COMPLETED")}, publish=_published)

    listed = (await client.get("/mpps", headers=TECHNOLOGIST)).json()
    assert {m["sop_instance_uid"] for m in listed} == {"1.2.9.1", "1.2.9.2"}
    completed = (await client.get("/mpps?status=COMPLETED", headers=TECHNOLOGIST)).json()
    assert [m["sop_instance_uid"] for m in completed] == ["1.2.9.2"]

    step = (await client.get("/mpps/1.2.9.1", headers=TECHNOLOGIST)).json()
    assert (step["status"], step["accession_number"], step["calling_ae_title"]) == (
        "IN PROGRESS",
        "ACC-77",
        "CT01",
    )
    assert step["worklist_item_fk"] == item["pk"]
    assert (await client.get("/mpps/1.2.9.3", headers=TECHNOLOGIST)).status_code == 404
    assert (await client.get("/mpps/x", headers=TECHNOLOGIST)).status_code == 422
