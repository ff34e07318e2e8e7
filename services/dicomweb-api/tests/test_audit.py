"""Every DICOMweb and REST access to PHI leaves one audit event, written
once the request's outcome is known: QIDO-RS (Query), WADO-RS incl. metadata,
frames and rendered (Instances Accessed), STOW-RS (Instances Transferred,
one event listing the studies), DELETE (Study Deleted), the management
API's archive reads and deletes.  Real PostgreSQL, the real app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from starlette.types import Message, Receive, Scope, Send

from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security import Principal, Role
from dicomweb_api.security.audit import PENDING_AUDIT, AuditAfterResponse, http_actor, query_objects
from dicomweb_api.testing import HeaderAuthenticator, Store, StoredInstance, part10_bytes
from pacs_common.audit import AuditEvent, AuditLog, AuditOutcome, AuditQuery, AuditSettings

PATIENT = "AUD-1"
STUDY = "1.2.826.0.1.3680043.8.498.4401"
SERIES = f"{STUDY}.1"
BOUNDARY = "audit-test-boundary"


def _instance(study: str = STUDY, series: str = SERIES, sop: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = PATIENT
    ds.PatientName = "Audit^Alice"
    ds.Modality = "CT"
    ds.StudyDate = "20240101"
    return ds


@pytest.fixture
def dicomweb_app(api_context: ApiContext, db_pool: asyncpg.Pool) -> FastAPI:
    """The app with an audit log (the shared fixture runs without one)."""
    return create_app(
        api_context, HeaderAuthenticator(), CollectorRegistry(), AuditLog(db_pool, AuditSettings())
    )


@pytest_asyncio.fixture(loop_scope="session")
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dicomweb_app, client=("10.9.8.7", 40000))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"x-test-roles": "radiologist"}
    ) as http:
        yield http


@pytest.fixture
async def stored(store: Store) -> list[StoredInstance]:
    return await store([_instance(), _instance()])


async def _events(db_pool: asyncpg.Pool, **filters: str) -> list[AuditEvent]:
    return await AuditLog(db_pool, AuditSettings()).query(AuditQuery.model_validate(filters))


async def _only(db_pool: asyncpg.Pool, event_id: str) -> AuditEvent:
    [event] = await _events(db_pool, event_id=event_id)
    return event


async def test_qido_search_is_a_query_naming_the_patient_and_study(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, stored: list[StoredInstance]
) -> None:
    response = await client.get(f"/dicom-web/studies/{STUDY}/series", params={"PatientID": PATIENT})
    assert response.status_code == 200, response.text
    event = await _only(db_pool, "110112")
    assert (event.actor, event.actor_method, event.actor_roles) == ("tester", "token", ["radiologist"])
    assert event.action == "E" and event.outcome == AuditOutcome.SUCCESS
    assert event.source_address == "10.9.8.7"
    assert event.patient_id == PATIENT and event.study_uids == [STUDY]
    query = next(o for o in event.objects if o.type == "query")
    assert query.query is not None and f"PatientID={PATIENT}" in query.query
    # A search naming nobody is still audited, without patient or study.
    assert (await client.get("/dicom-web/studies", params={"PatientName": "Audit*"})).status_code == 200
    newest = (await _events(db_pool, event_id="110112"))[0]
    assert newest.patient_id is None and newest.study_uids == []


async def test_wado_retrievals_are_instances_accessed(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, stored: list[StoredInstance]
) -> None:
    first = stored[0]
    paths = [
        f"/dicom-web/studies/{STUDY}",
        f"/dicom-web/studies/{STUDY}/metadata",
        f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{first.sop_instance_uid}",
    ]
    for path in paths:
        response = await client.get(path, headers={"accept": "*/*"} if "metadata" not in path else {})
        assert response.status_code == 200, (path, response.text)
    events = await _events(db_pool, event_id="110103")
    assert [e.details["path"] for e in reversed(events)] == paths
    for event in events:
        assert (event.actor, event.action, event.outcome) == ("tester", "R", AuditOutcome.SUCCESS)
        assert event.study_uids == [STUDY] and event.patient_id == PATIENT  # the patient from the index
    assert events[0].details["instance"] == first.sop_instance_uid


async def test_a_refused_retrieval_is_audited_as_a_failure(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    missing = "1.2.3.404"
    assert (await client.get(f"/dicom-web/studies/{missing}/metadata")).status_code == 404
    event = await _only(db_pool, "110103")
    assert event.outcome == AuditOutcome.MINOR_FAILURE and event.details["status"] == 404
    assert event.study_uids == [missing] and event.patient_id is None


async def test_rendered_and_frames_are_audited(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, stored: list[StoredInstance]
) -> None:
    sop = stored[0].sop_instance_uid
    base = f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{sop}"
    await client.get(f"{base}/rendered")
    await client.get(f"{base}/frames/1")
    events = await _events(db_pool, event_id="110103")
    assert [e.details["path"] for e in reversed(events)] == [f"{base}/rendered", f"{base}/frames/1"]
    assert all(e.study_uids == [STUDY] and e.details["instance"] == sop for e in events)


async def _multipart(*objects: bytes) -> AsyncIterator[bytes]:
    for data in objects:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


async def test_stow_is_one_event_listing_the_studies(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    other = "1.2.826.0.1.3680043.8.498.4402"
    objects = [
        part10_bytes(_instance()),
        part10_bytes(_instance()),
        part10_bytes(_instance(other, f"{other}.1")),
    ]
    response = await client.post(
        "/dicom-web/studies",
        content=_multipart(*objects),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "x-test-roles": "technologist",
        },
    )
    assert response.status_code == 200, response.text
    event = await _only(db_pool, "110104")
    assert (event.actor, event.action, event.outcome) == ("tester", "C", AuditOutcome.SUCCESS)
    assert event.actor_roles == ["technologist"]
    assert event.study_uids == [STUDY, other]
    assert event.details["stored"] == 3 and event.details["failed"] == 0


async def test_stow_of_nothing_storable_is_a_failure(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    response = await client.post(
        "/dicom-web/studies",
        content=_multipart(b"\x00" * 300),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "x-test-roles": "technologist",
        },
    )
    assert response.status_code == 409
    event = await _only(db_pool, "110104")
    assert event.outcome == AuditOutcome.SERIOUS_FAILURE and event.study_uids == []


async def test_delete_names_the_patient_it_removed(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, stored: list[StoredInstance]
) -> None:
    admin = {"x-test-roles": "administrator"}
    response = await client.delete(f"/dicom-web/studies/{STUDY}", headers=admin)
    assert response.status_code == 204, response.text
    event = await _only(db_pool, "110105")
    assert (event.actor, event.action, event.outcome) == ("tester", "D", AuditOutcome.SUCCESS)
    assert event.study_uids == [STUDY] and event.patient_id == PATIENT
    assert event.details["instances"] == 2 and event.details["level"] == "study"
    assert (await client.delete(f"/dicom-web/studies/{STUDY}", headers=admin)).status_code == 404
    again = (await _events(db_pool, event_id="110105"))[0]
    assert again.outcome == AuditOutcome.MINOR_FAILURE and again.study_uids == [STUDY]


async def test_rest_archive_reads_and_deletes(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, stored: list[StoredInstance]
) -> None:
    assert (await client.get("/api/v1/studies", params={"patient_id": PATIENT})).status_code == 200
    query = await _only(db_pool, "110112")
    assert query.patient_id == PATIENT and query.details["path"] == "/api/v1/studies"
    assert (await client.get(f"/api/v1/studies/{STUDY}")).status_code == 200
    read = await _only(db_pool, "110103")
    assert read.study_uids == [STUDY] and read.patient_id == PATIENT
    sop = stored[0].sop_instance_uid
    response = await client.delete(f"/api/v1/instances/{sop}", headers={"x-test-roles": "administrator"})
    assert response.status_code == 200, response.text
    deleted = await _only(db_pool, "110105")
    assert deleted.study_uids == [STUDY] and deleted.patient_id == PATIENT
    assert any(o.type == "instance" and o.id == sop for o in deleted.objects)


def _request(client: str = "10.1.2.3", query: bytes = b"") -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/dicom-web/studies",
            "headers": [(b"host", b"testserver")],
            "query_string": query,
            "client": (client, 50000),
            "scheme": "http",
            "server": ("testserver", 80),
        }
    )


def test_http_actor_from_the_principal_or_the_request() -> None:
    alice = Principal(subject="alice", roles=frozenset({Role.RADIOLOGIST, Role.VIEWER}), method="oidc")
    actor = http_actor(alice, _request())
    assert (actor.name, actor.method, actor.roles, actor.address) == (
        "alice",
        "oidc",
        ("radiologist", "viewer"),
        "10.1.2.3",
    )
    request = _request()
    request.state.principal = alice
    assert http_actor(None, request).name == "alice"
    refused = http_actor(None, _request(), actor="unknown", actor_method="token")
    assert (refused.name, refused.method, refused.roles) == ("unknown", "token", ())


def test_query_objects_name_exact_patients_and_studies_only() -> None:
    request = _request(query=b"PatientID=P1&StudyInstanceUID=1.2.3,1.2.4&00100020=P*")
    objects = query_objects(request, path_study="1.2.5")
    assert [(o.type, o.id) for o in objects[1:]] == [
        ("patient", "P1"),
        ("study", "1.2.5"),
        ("study", "1.2.3"),
        ("study", "1.2.4"),
    ]
    assert objects[0].type == "query" and objects[0].query is not None


async def test_audit_writes_wait_until_the_response_is_sent() -> None:
    """A viewer fetching frames never waits for the audit trail."""
    order: list[str] = []

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        async def write() -> None:
            order.append("audit written")

        scope["state"][PENDING_AUDIT].append(write)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"frame", "more_body": False})

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            order.append("response sent")

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await AuditAfterResponse(endpoint)({"type": "http", "path": "/"}, receive, send)
    assert order == ["response sent", "audit written"]
