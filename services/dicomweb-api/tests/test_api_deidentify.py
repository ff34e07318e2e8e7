"""``POST /api/v1/studies/{uid}/deidentify``: a de-identified copy of a
stored study goes through the normal ingest path (real filesystem storage,
the receiver's ingest messages) as a new study."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pydicom
import pytest
from fastapi import FastAPI
from pydicom.dataset import Dataset

from dicomweb_api.testing import Store, StoredInstance
from pacs_common.audit import AuditEventId, AuditLog, AuditSettings
from pacs_common.messaging.models import IngestMessage
from pacs_common.storage import ObjectStorage
from query_service.testing import dataset

SALT = "a-test-salt-of-enough-bytes"
ROLES = "x-test-roles"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = (f"{STUDY}.1", f"{STUDY}.2")
PATIENT_NAME = "DOE^JOHN"
PATIENT_ID = "PAT-4711"
ROWS = COLUMNS = 8

# Every test runs with a salt configured unless it removes it.
pytestmark = pytest.mark.usefixtures("salt")


def _image(series: str, sop: str, number: int) -> Dataset:
    ds = dataset(
        STUDY,
        series,
        sop,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
        PatientBirthDate="19700101",
        StudyDate="20240102",
        AccessionNumber="ACC123",
        InstitutionName="General Hospital",
        StudyDescription="CT chest DOE",
        InstanceNumber=number,
        FrameOfReferenceUID=f"{STUDY}.9",
        Rows=ROWS,
        Columns=COLUMNS,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=12,
        HighBit=11,
        PixelRepresentation=0,
    )
    ds.PixelData = bytes((number * 7 + i) % 256 for i in range(ROWS * COLUMNS * 2))
    return ds


@pytest.fixture
def salt(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PACS_DEIDENTIFY_SALT", SALT)
    return SALT


@pytest.fixture
async def stored(store: Store) -> list[StoredInstance]:
    """One study: two series, three instances with pixel data."""
    return await store(
        [
            _image(SERIES[0], f"{SERIES[0]}.1", 1),
            _image(SERIES[0], f"{SERIES[0]}.2", 2),
            _image(SERIES[1], f"{SERIES[1]}.1", 3),
        ]
    )


async def _objects(storage: ObjectStorage, messages: list[IngestMessage]) -> list[tuple[bytes, Dataset]]:
    def read(key: str) -> bytes:
        with storage.open(key) as stream:
            return stream.read()

    result: list[tuple[bytes, Dataset]] = []
    for message in messages:
        data = await asyncio.to_thread(read, message.location.key)
        result.append((data, pydicom.dcmread(io.BytesIO(data))))
    return result


async def _deidentify(
    client: httpx.AsyncClient,
    study: str = STUDY,
    body: dict[str, object] | None = None,
    roles: str | None = None,
) -> httpx.Response:
    headers = {ROLES: roles} if roles is not None else {}
    return await client.post(f"/api/v1/studies/{study}/deidentify", json=body, headers=headers)


async def test_copy_is_deidentified_consistent_and_keeps_the_pixels(
    client: httpx.AsyncClient,
    stored: list[StoredInstance],
    ingest_messages: list[IngestMessage],
    hot_storage: ObjectStorage,
) -> None:
    response = await _deidentify(client, body={})
    assert response.status_code == 201, response.text
    body = response.json()
    new_study = body["study_instance_uid"]
    assert new_study.startswith("2.25.") and new_study != STUDY
    assert (body["source_study_instance_uid"], body["instances_stored"], body["instances_failed"]) == (
        STUDY,
        3,
        0,
    )
    assert body["failures"] == []
    assert body["retrieve_url"] == f"http://testserver/dicom-web/studies/{new_study}"
    assert body["query_url"] == f"http://testserver/dicom-web/studies?StudyInstanceUID={new_study}"

    assert len(ingest_messages) == 3
    assert {m.study_instance_uid for m in ingest_messages} == {new_study}
    assert {m.source.protocol for m in ingest_messages} == {"import"}
    objects = await _objects(hot_storage, ingest_messages)
    originals = {s.sop_instance_uid: pydicom.dcmread(io.BytesIO(s.data)) for s in stored}
    new_series: dict[str, str] = {}
    frames = set()
    for data, ds in objects:
        for text in (PATIENT_NAME, PATIENT_ID, "ACC123", "General Hospital", "19700101"):
            assert text.encode() not in data
        assert str(ds.PatientName) != PATIENT_NAME and ds.PatientID != PATIENT_ID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID == new_study
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID not in originals
        frames.add(ds.FrameOfReferenceUID)
        original = next(o for o in originals.values() if o.InstanceNumber == ds.InstanceNumber)
        assert ds.PixelData == original.PixelData
        assert new_series.setdefault(original.SeriesInstanceUID, ds.SeriesInstanceUID) == ds.SeriesInstanceUID
    # Two series stay two series, every reference maps the same way.
    assert len(set(new_series.values())) == 2 and not set(new_series.values()) & set(SERIES)
    assert len(frames) == 1
    # The pseudonym is the same for every instance of the patient.
    assert len({(str(ds.PatientName), ds.PatientID) for _, ds in objects}) == 1


async def test_another_scope_is_another_study_and_the_same_scope_the_same(
    client: httpx.AsyncClient,
    stored: list[StoredInstance],
    ingest_messages: list[IngestMessage],
) -> None:
    first = await _deidentify(client, body={"scope": "project-a"})
    again = await _deidentify(client, body={"scope": "project-a"})
    other = await _deidentify(client, body={"scope": "project-b", "patient_id": "SUBJ-01"})
    for response in (first, again, other):
        assert response.status_code == 201, response.text
        assert response.json()["instances_stored"] == 3
    assert first.json()["study_instance_uid"] == again.json()["study_instance_uid"]
    assert first.json()["study_instance_uid"] != other.json()["study_instance_uid"]
    first_keys = {m.location.key for m in ingest_messages[:3]}
    assert {m.location.key for m in ingest_messages[3:6]} == first_keys  # the same objects again
    assert not {m.location.key for m in ingest_messages[6:]} & first_keys


async def test_unreadable_instances_are_reported_and_the_rest_copied(
    client: httpx.AsyncClient,
    stored: list[StoredInstance],
    ingest_messages: list[IngestMessage],
    hot_storage: ObjectStorage,
    db_pool: asyncpg.Pool,
) -> None:
    await asyncio.to_thread(hot_storage.delete, stored[1].location.key)
    await db_pool.execute(
        "UPDATE instance_location SET tier = 'cold' FROM instance i"
        " WHERE i.pk = instance_location.instance_fk AND i.sop_instance_uid = $1",
        stored[2].sop_instance_uid,
    )
    response = await _deidentify(client)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["instances_stored"], body["instances_failed"]) == (1, 2)
    assert sorted(body["failures"], key=lambda f: f["sop_instance_uid"]) == [
        {"sop_instance_uid": stored[1].sop_instance_uid, "reason": "the stored object is missing"},
        {"sop_instance_uid": stored[2].sop_instance_uid, "reason": "storage tier cold is not configured"},
    ]
    assert len(ingest_messages) == 1


async def test_nothing_copied_is_503(
    client: httpx.AsyncClient, stored: list[StoredInstance], hot_storage: ObjectStorage
) -> None:
    for instance in stored:
        await asyncio.to_thread(hot_storage.delete, instance.location.key)
    response = await _deidentify(client)
    assert response.status_code == 503
    assert response.json()["detail"]["instances_failed"] == 3


async def test_unknown_study_is_404(client: httpx.AsyncClient, stored: list[StoredInstance]) -> None:
    assert (await _deidentify(client, study="1.2.3.999")).status_code == 404
    assert (await _deidentify(client, study="not-a-uid")).status_code == 422


async def test_without_a_salt_the_service_is_unavailable(
    client: httpx.AsyncClient,
    stored: list[StoredInstance],
    monkeypatch: pytest.MonkeyPatch,
    ingest_messages: list[IngestMessage],
) -> None:
    monkeypatch.delenv("PACS_DEIDENTIFY_SALT", raising=False)
    response = await _deidentify(client)
    assert response.status_code == 503
    assert "PACS_DEIDENTIFY_SALT" in response.json()["detail"]
    monkeypatch.setenv("PACS_DEIDENTIFY_SALT", "short")
    assert (await _deidentify(client)).status_code == 503
    assert ingest_messages == []


async def test_options_are_validated(client: httpx.AsyncClient, stored: list[StoredInstance]) -> None:
    assert (await _deidentify(client, body={"unknown": True})).status_code == 422
    assert (await _deidentify(client, body={"patient_id": "A\\B"})).status_code == 422


@pytest.mark.parametrize(("roles", "status"), [("viewer", 403), ("technologist", 403), ("radiologist", 201)])
async def test_needs_the_export_permission(
    client: httpx.AsyncClient, stored: list[StoredInstance], roles: str, status: int
) -> None:
    assert (await _deidentify(client, roles=roles)).status_code == status


@pytest.fixture
async def audited_app(dicomweb_app: FastAPI, db_pool: asyncpg.Pool) -> AsyncIterator[FastAPI]:
    dicomweb_app.state.audit = AuditLog(db_pool, AuditSettings(source_id="pacs-test"))
    try:
        yield dicomweb_app
    finally:
        await dicomweb_app.state.audit.aclose()


async def test_the_export_is_audited(
    audited_app: FastAPI,
    client: httpx.AsyncClient,
    stored: list[StoredInstance],
    db_pool: asyncpg.Pool,
) -> None:
    response = await _deidentify(client)
    assert response.status_code == 201
    row = await db_pool.fetchrow("SELECT event_id, outcome, patient_id, study_uids FROM audit_event")
    assert row is not None
    assert (row["event_id"], row["outcome"], row["patient_id"]) == (AuditEventId.EXPORT.value, 0, PATIENT_ID)
    assert list(row["study_uids"]) == [STUDY, response.json()["study_instance_uid"]]
