"""``/api/v1`` clinical data against a real index and storage: annotations
and measurements, viewer state per user, key images as Key Object
Selection documents stored through the ingest path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydicom
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.testing import HeaderAuthenticator, Store
from pacs_common.messaging.models import IngestMessage
from pacs_common.storage import ObjectStorage
from query_service.testing import dataset

STUDY = "1.2.826.0.1.3680043.10.1"
SERIES = f"{STUDY}.1"
SOP1, SOP2 = f"{SERIES}.1", f"{SERIES}.2"
MULTIFRAME = f"{SERIES}.3"
OTHER_SERIES = f"{STUDY}.2"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _as(subject: str, roles: str = "radiologist") -> dict[str, str]:
    return {"x-test-subject": subject, "x-test-roles": roles}


ALICE = _as("alice")
BOB = _as("bob")
ADMIN = _as("root", "administrator")


@pytest.fixture
async def client(api_context: ApiContext) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(api_context, HeaderAuthenticator(), CollectorRegistry())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.fixture
async def study(store: Store) -> None:
    common: dict[str, Any] = {
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "AccessionNumber": "ACC9",
        "StudyID": "9",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "SeriesNumber": 1,
        "Rows": 4,
        "Columns": 4,
    }
    await store(
        [
            dataset(STUDY, SERIES, SOP1, InstanceNumber=1, **common),
            dataset(STUDY, SERIES, SOP2, InstanceNumber=2, **common),
            dataset(STUDY, SERIES, MULTIFRAME, InstanceNumber=3, NumberOfFrames=3, **common),
            dataset(STUDY, OTHER_SERIES, f"{OTHER_SERIES}.1", **common),
        ]
    )  # fmt: skip


def _url(path: str) -> str:
    return f"/api/v1/studies/{STUDY}/{path}"


async def test_annotations_crud_by_their_author(client: httpx.AsyncClient, study: None) -> None:
    body = {"sop_instance_uid": MULTIFRAME, "frame_number": 2, "data": {"type": "arrow", "text": "lesion"}}
    created = await client.post(_url("annotations"), json=body, headers=ALICE)
    assert created.status_code == 201
    item = created.json()
    assert (item["author"], item["kind"], item["series_instance_uid"], item["frame_number"]) == (
        "alice", "annotation", SERIES, 2
    )  # fmt: skip
    url = _url(f"annotations/{item['id']}")
    assert (await client.get(url, headers=BOB)).json()["data"] == {"type": "arrow", "text": "lesion"}
    # A measurement is another collection: the annotation is not there.
    assert (await client.get(_url(f"measurements/{item['id']}"), headers=ALICE)).status_code == 404
    changed = {"series_instance_uid": OTHER_SERIES, "data": {"type": "text", "text": "see here"}}
    assert (await client.put(url, json=changed, headers=BOB)).status_code == 403
    replaced = await client.put(url, json=changed, headers=ALICE)
    assert replaced.status_code == 200
    assert replaced.json()["sop_instance_uid"] is None
    assert replaced.json()["updated_at"] > item["updated_at"]
    assert [a["id"] for a in (await client.get(_url("annotations"), headers=BOB)).json()] == [item["id"]]
    assert (await client.delete(url, headers=BOB)).status_code == 403
    assert (await client.delete(url, headers=ADMIN)).status_code == 204
    assert (await client.get(url, headers=ALICE)).status_code == 404
    assert (await client.get(_url("annotations"), headers=ALICE)).json() == []


async def test_measurements_and_reference_checks(client: httpx.AsyncClient, study: None) -> None:
    length = {"sop_instance_uid": SOP1, "data": {"type": "length", "value": 12.5, "unit": "mm"}}
    created = await client.post(_url("measurements"), json=length, headers=ALICE)
    assert created.status_code == 201
    assert created.json()["kind"] == "measurement"
    listed = (await client.get(_url("measurements"), headers=ALICE)).json()
    assert [m["data"]["value"] for m in listed] == [12.5]
    assert (await client.get(_url("annotations"), headers=ALICE)).json() == []
    bad = [
        ({"sop_instance_uid": "9.9.9", "data": {}}, 422),  # not in the study
        ({"sop_instance_uid": SOP1, "series_instance_uid": OTHER_SERIES, "data": {}}, 422),
        ({"series_instance_uid": "9.9", "data": {}}, 422),
        ({"sop_instance_uid": MULTIFRAME, "frame_number": 4, "data": {}}, 422),
        ({"frame_number": 1, "data": {}}, 422),  # a frame of no instance
        ({"sop_instance_uid": SOP1}, 422),  # no document
        ({"data": {}, "author": "mallory"}, 422),  # the author is the caller
    ]
    for body, status in bad:
        assert (await client.post(_url("measurements"), json=body, headers=ALICE)).status_code == status, body
    missing = await client.post("/api/v1/studies/9.9/measurements", json={"data": {}}, headers=ALICE)
    assert missing.status_code == 404


async def test_viewer_state_per_user(client: httpx.AsyncClient, study: None) -> None:
    url = _url("viewer-state")
    assert (await client.get(url, headers=ALICE)).status_code == 404
    saved = await client.put(url, json={"state": {"layout": "2x2", "series": [SERIES]}}, headers=ALICE)
    assert saved.status_code == 200
    assert (saved.json()["subject"], saved.json()["state"]["layout"]) == ("alice", "2x2")
    await client.put(url, json={"state": {"layout": "1x1"}}, headers=BOB)
    await client.put(url, json={"state": {"layout": "1x2"}}, headers=ALICE)
    assert (await client.get(url, headers=ALICE)).json()["state"] == {"layout": "1x2"}
    assert (await client.get(url, headers=BOB)).json()["state"] == {"layout": "1x1"}
    assert (
        await client.put("/api/v1/studies/9.9/viewer-state", json={"state": {}}, headers=ALICE)
    ).status_code == 404


async def test_key_images_stored_as_kos_through_ingest(
    client: httpx.AsyncClient,
    study: None,
    store: Store,
    hot_storage: ObjectStorage,
    ingest_messages: list[IngestMessage],
) -> None:
    request = {"instances": [SOP2, SOP1, f"{OTHER_SERIES}.1"], "description": "for the tumor board"}
    response = await client.post(_url("key-images"), json=request, headers=ALICE)
    assert response.status_code == 202, response.text
    stored = response.json()
    assert (stored["study_instance_uid"], stored["sop_class_uid"]) == (STUDY, KOS)
    assert stored["referenced_instances"] == [SOP2, SOP1, f"{OTHER_SERIES}.1"]
    [message] = ingest_messages
    assert (message.sop_instance_uid, message.sop_class_uid, message.source.protocol) == (
        stored["sop_instance_uid"], KOS, "import"
    )  # fmt: skip
    with hot_storage.open(message.location.key) as f:
        data = f.read()
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert (ds.Modality, ds.PatientID, ds.AccessionNumber, ds.StudyInstanceUID) == ("KO", "P1", "ACC9", STUDY)
    assert ds.SeriesInstanceUID not in (SERIES, OTHER_SERIES)
    assert ds.SeriesNumber == 2
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000",
        "DCM",
        "Of Interest",
    )
    [evidence] = ds.CurrentRequestedProcedureEvidenceSequence
    referenced = {
        series.SeriesInstanceUID: sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence)
        for series in evidence.ReferencedSeriesSequence
    }
    assert referenced == {SERIES: [SOP1, SOP2], OTHER_SERIES: [f"{OTHER_SERIES}.1"]}
    texts = [item.TextValue for item in ds.ContentSequence if item.ValueType == "TEXT"]
    assert texts == ["for the tumor board"]

    # Nothing is listed before the ingest worker indexed the document; then it is, and QIDO finds it.
    assert (await client.get(_url("key-images"), headers=ALICE)).json() == []
    await store([data])
    [listed] = (await client.get(_url("key-images"), headers=BOB)).json()
    assert listed["sop_instance_uid"] == stored["sop_instance_uid"]
    assert sorted(listed["referenced_instances"]) == sorted(request["instances"])
    assert listed["title"] is not None and "113000" in listed["title"].values()
    qido = await client.get(f"/dicom-web/studies/{STUDY}/series", params={"Modality": "KO"}, headers=BOB)
    assert qido.status_code == 200
    assert [s["0020000E"]["Value"] for s in qido.json()] == [[ds.SeriesInstanceUID]]


async def test_key_images_refused(
    client: httpx.AsyncClient, study: None, ingest_messages: list[IngestMessage]
) -> None:
    missing = await client.post(_url("key-images"), json={"instances": [SOP1, "9.9.9"]}, headers=ALICE)
    assert missing.status_code == 422
    assert "9.9.9" in missing.json()["detail"]
    assert (await client.post(_url("key-images"), json={"instances": []}, headers=ALICE)).status_code == 422
    other = await client.post("/api/v1/studies/9.9/key-images", json={"instances": [SOP1]}, headers=ALICE)
    assert other.status_code == 404
    assert (await client.get("/api/v1/studies/9.9/key-images", headers=ALICE)).status_code == 404
    viewer = await client.post(_url("key-images"), json={"instances": [SOP1]}, headers=_as("v", "viewer"))
    assert viewer.status_code == 403
    assert ingest_messages == []


async def test_clinical_data_needs_the_clinical_permission(client: httpx.AsyncClient, study: None) -> None:
    for path in ("annotations", "measurements", "viewer-state", "key-images"):
        assert (await client.get(_url(path))).status_code == 401
        assert (await client.get(_url(path), headers=_as("t", "technologist"))).status_code == 403
