"""``/api/v1/exports`` (an EXPORT job building a File-set, downloaded as a
streamed zip) and ``/api/v1/imports`` (a zip upload through the ingest path)."""

from __future__ import annotations

import asyncio
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydicom.fileset import FileSet

from dicomweb_api.api import media
from dicomweb_api.app import create_app
from dicomweb_api.context import ApiContext
from dicomweb_api.testing import HeaderAuthenticator, Store, StoredInstance
from pacs_common.media.settings import MediaSettings
from pacs_common.media.testing import dcmtk_records, image, part10
from pacs_common.messaging.models import IngestMessage

STUDY = "1.2.826.0.1.3680043.8.498.91"
OTHER = "1.2.826.0.1.3680043.8.498.92"
ROLES = "x-test-roles"


@pytest.fixture
def dicomweb_app(api_context: ApiContext) -> FastAPI:
    """The app with the media routes (added here until routes.py includes them)."""
    app = create_app(api_context, HeaderAuthenticator(), CollectorRegistry())
    if not any(getattr(route, "path", "") == "/api/v1/exports" for route in app.routes):
        app.include_router(media.create_router(), prefix="/api/v1")
    return app


@pytest.fixture
async def stored(store: Store) -> list[StoredInstance]:
    return await store(
        [
            image(study, f"{study}.{s}", f"{study}.{s}.{n}", number=n, StudyID="1")
            for study in (STUDY, OTHER)
            for s in (1, 2)
            for n in (1, 2)
        ]
    )


def _content(path: str) -> bytes:
    return Path(path).read_bytes()


async def _finished(client: httpx.AsyncClient, job_id: int) -> dict[str, Any]:
    for _ in range(300):
        response = await client.get(f"/api/v1/exports/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["job"]["state"] not in ("queued", "running"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"export {job_id} did not finish")


async def test_export_job_then_zip_download(
    client: httpx.AsyncClient, stored: list[StoredInstance], tmp_path: Path
) -> None:
    response = await client.post("/api/v1/exports", json={"study_uids": [STUDY, OTHER]})
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["job"]["id"]
    assert accepted["job"]["kind"] == "export"
    assert accepted["job"]["progress_total"] == 8
    assert response.headers["location"].endswith(f"/api/v1/exports/{job_id}")

    status = await _finished(client, job_id)
    assert status["job"]["state"] == "done"
    assert (status["job"]["progress_done"], status["job"]["progress_total"]) == (8, 8)
    assert (status["instances_written"], status["failures"]) == (8, [])
    # The job is listed with the others.
    jobs = (await client.get("/api/v1/jobs", params={"kind": "export"})).json()
    assert [j["id"] for j in jobs["items"]] == [job_id]

    download = await client.get(status["download_url"])
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "application/zip"
    assert f"export-{job_id}.zip" in download.headers["content-disposition"]
    root = tmp_path / "unzipped"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        archive.extractall(root)
    assert dcmtk_records(root / "DICOMDIR").count("IMAGE") == 8
    file_set = FileSet(pydicom.dcmread(root / "DICOMDIR"))
    by_sop = {s.sop_instance_uid: s.data for s in stored}
    assert {i.SOPInstanceUID: _content(i.path) for i in file_set} == by_sop
    # A second download gives the same archive.
    again = await client.get(status["download_url"])
    assert again.content == download.content


async def test_deidentified_explicit_le_export(
    client: httpx.AsyncClient, stored: list[StoredInstance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"study_uids": [STUDY], "deidentify": True, "explicit_vr_little_endian": True}
    monkeypatch.delenv("PACS_DEIDENTIFY_SALT", raising=False)
    assert (await client.post("/api/v1/exports", json=body)).status_code == 503
    # Signing without a configured key and certificate: refused, with the reason.
    monkeypatch.delenv("PACS_SIGNATURE_KEY_FILE", raising=False)
    unsigned = await client.post("/api/v1/exports", json={"study_uids": [STUDY], "sign": True})
    assert unsigned.status_code == 503 and "PACS_SIGNATURE_KEY_FILE" in unsigned.text
    monkeypatch.setenv("PACS_DEIDENTIFY_SALT", "a-test-salt-of-enough-bytes")
    response = await client.post("/api/v1/exports", json=body)
    assert response.status_code == 202, response.text
    status = await _finished(client, response.json()["job"]["id"])
    assert status["job"]["params"] == {
        "study_uids": [STUDY],
        "deidentify": True,
        "explicit_vr_little_endian": True,
        "sign": False,
    }
    download = await client.get(status["download_url"])
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        for name in archive.namelist():
            assert b"DOE" not in archive.read(name)
        archive.extractall(tmp_path / "set")
    file_set = FileSet(pydicom.dcmread(tmp_path / "set" / "DICOMDIR"))
    assert len(file_set) == 4
    assert {i.StudyInstanceUID for i in file_set} != {STUDY}


async def test_export_refusals(client: httpx.AsyncClient, stored: list[StoredInstance]) -> None:
    missing = await client.post("/api/v1/exports", json={"study_uids": [STUDY, "1.2.3.404"]})
    assert missing.status_code == 404
    assert "1.2.3.404" in missing.text
    assert (await client.post("/api/v1/exports", json={"study_uids": []})).status_code == 422
    assert (await client.get("/api/v1/exports/999/download")).status_code == 404
    viewer = await client.post("/api/v1/exports", json={"study_uids": [STUDY]}, headers={ROLES: "viewer"})
    assert viewer.status_code == 403
    # A radiologist may export but not import.
    radiologist = {ROLES: "radiologist"}
    accepted = await client.post("/api/v1/exports", json={"study_uids": [STUDY]}, headers=radiologist)
    assert accepted.status_code == 202
    assert (await _finished(client, accepted.json()["job"]["id"]))["job"]["state"] == "done"
    upload = await client.post(
        "/api/v1/imports", content=b"PK", headers={**radiologist, "content-type": "application/zip"}
    )
    assert upload.status_code == 403


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def test_import_zip_upload(
    client: httpx.AsyncClient, ingest_messages: list[IngestMessage], api_context: ApiContext
) -> None:
    good = [part10(image(STUDY, f"{STUDY}.1", f"{STUDY}.1.{n}", number=n)) for n in (1, 2)]
    body = _zip({"x/1.dcm": good[0], "x/2.dcm": good[1], "readme.txt": b"hello", "x/cut.dcm": good[0][:-30]})

    response = await client.post(
        "/api/v1/imports", content=body, headers={ROLES: "technologist", "content-type": "application/zip"}
    )
    assert response.status_code == 200, response.text
    statuses = {f["path"]: f["status"] for f in response.json()["files"]}
    assert statuses == {
        "upload.zip:x/1.dcm": "stored",
        "upload.zip:x/2.dcm": "stored",
        "upload.zip:readme.txt": "not_dicom",
        "upload.zip:x/cut.dcm": "refused",
    }
    assert sorted(m.sop_instance_uid for m in ingest_messages) == [f"{STUDY}.1.1", f"{STUDY}.1.2"]
    assert all(m.source.protocol == "import" for m in ingest_messages)
    assert not list((api_context.settings.spool_dir / "imports").iterdir())  # spool cleaned

    wrong_type = await client.post("/api/v1/imports", content=body, headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    not_zip = await client.post(
        "/api/v1/imports", content=b"hello", headers={"content-type": "application/zip"}
    )
    assert not_zip.status_code == 400


async def test_import_size_limit(api_context: ApiContext) -> None:
    app = create_app(api_context, HeaderAuthenticator(), CollectorRegistry())
    app.include_router(media.create_router(MediaSettings(max_import_bytes=1000)), prefix="/media-test")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as small:
        response = await small.post(
            "/media-test/imports",
            content=_zip({"big.bin": os.urandom(4000)}),  # incompressible
            headers={ROLES: "technologist", "content-type": "application/zip"},
        )
    assert response.status_code == 413
