"""``/api/v1`` patients, studies, series, instances against a real index:
filters, paging, sorting, details, 404s and bad parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from query_service.testing import dataset, index

VIEWER = {"x-test-roles": "viewer"}


@pytest.fixture
async def client(dicomweb_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app (conftest's ``dicomweb_app``) under /api/v1, sending no credentials unless told."""
    transport = httpx.ASGITransport(app=dicomweb_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as http:
        yield http


@pytest.fixture
async def archive(db_pool: asyncpg.Pool) -> None:
    """P1 DOE^JOHN: study 1.1 (2020, CT+SR, 3 instances), study 1.3 (2019, CT);
    P2 SMITH^ANNA: study 1.2 (2021, MR)."""
    await index(
        db_pool,
        [
            dataset("1.1", "1.1.1", "1.1.1.1", StudyDate="20200101", AccessionNumber="ACC1",
                    SeriesNumber=1, InstanceNumber=2),
            dataset("1.1", "1.1.1", "1.1.1.2", StudyDate="20200101", AccessionNumber="ACC1",
                    SeriesNumber=1, InstanceNumber=1),
            dataset("1.1", "1.1.2", "1.1.2.1", StudyDate="20200101", AccessionNumber="ACC1",
                    SeriesNumber=2, modality="SR"),
            dataset("1.2", "1.2.1", "1.2.1.1", StudyDate="20210615", AccessionNumber="ACC2",
                    patient_id="P2", patient_name="SMITH^ANNA", modality="MR", SeriesNumber=1),
            dataset("1.3", "1.3.1", "1.3.1.1", StudyDate="20190310", AccessionNumber="ACC3",
                    SeriesNumber=1),
        ],
    )  # fmt: skip


def _uids(body: dict[str, Any], key: str) -> list[str]:
    return [item[key] for item in body["items"]]


async def test_listings_need_credentials_and_read(client: httpx.AsyncClient) -> None:
    assert (await client.get("/studies")).status_code == 401
    assert (await client.get("/studies", headers={"x-test-roles": ""})).status_code == 403


async def test_studies_newest_first_with_total(client: httpx.AsyncClient, archive: None) -> None:
    response = await client.get("/studies", headers=VIEWER)
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 3
    assert response.headers["x-total-count"] == "3"
    assert _uids(body, "study_instance_uid") == ["1.2", "1.1", "1.3"]
    first = body["items"][1]
    assert first["patient_name"] == "DOE^JOHN"
    assert sorted(first["modalities_in_study"]) == ["CT", "SR"]
    assert first["number_of_series"] == 2
    assert first["number_of_instances"] == 3
    assert first["size_bytes"] > 0


async def test_studies_paging_and_sorting(client: httpx.AsyncClient, archive: None) -> None:
    page = (await client.get("/studies?sort=study_date&limit=2&offset=1", headers=VIEWER)).json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 1)
    assert _uids(page, "study_instance_uid") == ["1.1", "1.2"]
    beyond = (await client.get("/studies?offset=10", headers=VIEWER)).json()
    assert (beyond["total"], beyond["items"]) == (3, [])
    by_name = (await client.get("/studies?sort=-patient_name,study_date", headers=VIEWER)).json()
    assert _uids(by_name, "study_instance_uid") == ["1.2", "1.3", "1.1"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("patient_id=P1", ["1.1", "1.3"]),
        ("patient_id=P*", ["1.2", "1.1", "1.3"]),
        ("patient_name=smith", ["1.2"]),
        ("patient_name=doe^j*", ["1.1", "1.3"]),
        ("study_date_from=2020-01-01", ["1.2", "1.1"]),
        ("study_date_from=20190101&study_date_to=20201231", ["1.1", "1.3"]),
        ("modality=SR", ["1.1"]),
        ("accession_number=ACC3", ["1.3"]),
        ("accession_number=acc3", []),
        ("patient_name=100%", []),
    ],
)
async def test_study_filters(
    client: httpx.AsyncClient, archive: None, query: str, expected: list[str]
) -> None:
    response = await client.get(f"/studies?{query}", headers=VIEWER)
    assert response.status_code == 200
    body = response.json()
    assert _uids(body, "study_instance_uid") == expected
    assert body["total"] == len(expected)


async def test_patients(client: httpx.AsyncClient, archive: None) -> None:
    body = (await client.get("/patients", headers=VIEWER)).json()
    assert body["total"] == 2
    assert [(p["patient_id"], p["number_of_studies"]) for p in body["items"]] == [("P1", 2), ("P2", 1)]
    by_count = (await client.get("/patients?sort=-number_of_studies", headers=VIEWER)).json()
    assert _uids(by_count, "patient_id") == ["P1", "P2"]
    mr = (await client.get("/patients?modality=MR", headers=VIEWER)).json()
    assert _uids(mr, "patient_id") == ["P2"]
    recent = (await client.get("/patients?study_date_from=20200601", headers=VIEWER)).json()
    assert _uids(recent, "patient_id") == ["P2"]


async def test_series(client: httpx.AsyncClient, archive: None) -> None:
    body = (await client.get("/series?study_instance_uid=1.1", headers=VIEWER)).json()
    assert body["total"] == 2
    assert _uids(body, "series_instance_uid") == ["1.1.1", "1.1.2"]
    assert body["items"][0]["number_of_instances"] == 2
    ct = (await client.get("/series?modality=CT&sort=-study_date", headers=VIEWER)).json()
    assert _uids(ct, "series_instance_uid") == ["1.1.1", "1.3.1"]


async def test_instances(client: httpx.AsyncClient, archive: None) -> None:
    body = (await client.get("/instances?series_instance_uid=1.1.1", headers=VIEWER)).json()
    assert _uids(body, "sop_instance_uid") == ["1.1.1.2", "1.1.1.1"]
    assert body["items"][0]["tier"] == "hot"
    assert body["items"][0]["size"] > 0
    newest = (await client.get("/instances?sort=-instance_number&patient_id=P1", headers=VIEWER)).json()
    assert newest["total"] == 4
    assert newest["items"][0]["sop_instance_uid"] == "1.1.1.1"


async def test_study_detail(client: httpx.AsyncClient, archive: None) -> None:
    response = await client.get("/studies/1.1", headers=VIEWER)
    assert response.status_code == 200
    study = response.json()
    assert study["accession_number"] == "ACC1"
    assert study["number_of_instances"] == 3
    assert [s["series_instance_uid"] for s in study["series"]] == ["1.1.1", "1.1.2"]
    assert [s["number_of_instances"] for s in study["series"]] == [2, 1]


async def test_series_detail(client: httpx.AsyncClient, archive: None) -> None:
    series = (await client.get("/series/1.1.1", headers=VIEWER)).json()
    assert series["study_instance_uid"] == "1.1"
    assert series["patient_id"] == "P1"
    assert series["instances_by_tier"] == {"hot": 2}


async def test_instance_detail(client: httpx.AsyncClient, archive: None) -> None:
    instance = (await client.get("/instances/1.2.1.1", headers=VIEWER)).json()
    assert instance["study_instance_uid"] == "1.2"
    assert instance["modality"] == "MR"
    assert instance["availability"] == "ONLINE"
    location = instance["location"]
    assert location["tier"] == "hot"
    assert location["key"] == "1.2/1.2.1.1.dcm"
    assert len(location["sha256"]) == 64
    assert location["size"] == instance["size"] > 0
    assert location["sha256"] == instance["content_sha256"]


@pytest.mark.parametrize("path", ["/studies/9.9", "/series/9.9", "/instances/9.9"])
async def test_unknown_uid_is_404(client: httpx.AsyncClient, archive: None, path: str) -> None:
    response = await client.get(path, headers=VIEWER)
    assert response.status_code == 404
    assert "9.9" in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("sort=patient_birth_date", 400),
        ("sort=-pk", 400),
        ("sort=,", 400),
        ("study_date_from=2020-13-01", 400),
        ("study_date_from=yesterday", 400),
        ("study_date_from=20210101&study_date_to=20200101", 400),
        ("limit=0", 422),
        ("limit=1001", 422),
        ("offset=-1", 422),
    ],
)
async def test_bad_parameters(client: httpx.AsyncClient, query: str, status: int) -> None:
    response = await client.get(f"/studies?{query}", headers=VIEWER)
    assert response.status_code == status
    assert response.json()["detail"]


async def test_bad_uid_in_path_is_422(client: httpx.AsyncClient) -> None:
    assert (await client.get("/studies/not-a-uid", headers=VIEWER)).status_code == 422
