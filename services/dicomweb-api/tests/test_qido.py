"""QIDO-RS against the real app, query-service, index and storage."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from dicomweb_api.testing import ROLES_HEADER, Store
from query_service.testing import dataset

BASE = "http://testserver/dicom-web"
S1, S2, S3 = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.2", "1.2.826.0.1.3680043.10.3"


def _value(match: dict[str, Any], tag: str) -> Any:
    values = match.get(tag, {}).get("Value") or [None]
    return values[0]


def _values(matches: list[dict[str, Any]], tag: str) -> list[Any]:
    return [_value(m, tag) for m in matches]


@pytest.fixture
async def three_studies(store: Store) -> None:
    await store(
        [
            dataset(
                S1, f"{S1}.1", f"{S1}.1.1", patient_id="P1", patient_name="DOE^JOHN", StudyDate="20200315",
                StudyDescription="CHEST", AdmittingDiagnosesDescription="COUGH", PatientComments="first",
                SeriesNumber=1, InstanceNumber=1,
            ),
            dataset(
                S1, f"{S1}.1", f"{S1}.1.2", patient_id="P1", patient_name="DOE^JOHN", StudyDate="20200315",
                StudyDescription="CHEST", AdmittingDiagnosesDescription="COUGH", PatientComments="first",
                SeriesNumber=1, InstanceNumber=2,
            ),
            dataset(
                S1, f"{S1}.2", f"{S1}.2.1", patient_id="P1", patient_name="DOE^JOHN", StudyDate="20200315",
                StudyDescription="CHEST", AdmittingDiagnosesDescription="COUGH", PatientComments="first",
                modality="SR", SeriesNumber=2, InstanceNumber=1,
            ),
            dataset(
                S2, f"{S2}.1", f"{S2}.1.1", patient_id="P2", patient_name="SMITH^ANN", StudyDate="20210704",
                modality="MR", SeriesNumber=1, InstanceNumber=1,
            ),
            dataset(
                S3, f"{S3}.1", f"{S3}.1.1", patient_id="P3", patient_name="DOEBLER^MAX", StudyDate="20191231",
                modality="CT", SeriesNumber=1, InstanceNumber=1,
            ),
        ]
    )  # fmt: skip


async def _search(client: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"/dicom-web{path}", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body: list[dict[str, Any]] = response.json()
    return body


async def test_studies_carry_the_default_attributes_and_their_retrieve_url(
    client: httpx.AsyncClient, three_studies: None
) -> None:
    response = await client.get("/dicom-web/studies", params={"PatientID": "P1"})
    assert response.status_code == 200
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    assert "warning" not in response.headers
    [study] = response.json()
    assert study["0020000D"] == {"vr": "UI", "Value": [S1]}
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}
    assert study["00081190"] == {"vr": "UR", "Value": [f"{BASE}/studies/{S1}"]}
    assert _value(study, "00080020") == "20200315"
    assert _value(study, "00201206") == 2  # NumberOfStudyRelatedSeries
    assert _value(study, "00201208") == 3  # NumberOfStudyRelatedInstances
    assert sorted(study["00080061"]["Value"]) == ["CT", "SR"]  # ModalitiesInStudy
    assert _value(study, "00080005") == "ISO_IR 192"
    for tag in ("00080030", "00080050", "00080090", "00100030", "00100040", "00200010", "00080056"):
        assert tag in study, tag
    # Not a default attribute: only with includefield.
    assert "00104000" not in study


async def test_wildcards_tags_and_keywords(client: httpx.AsyncClient, three_studies: None) -> None:
    assert sorted(_values(await _search(client, "/studies", PatientName="DOE*"), "0020000D")) == [S1, S3]
    assert _values(await _search(client, "/studies", PatientName="DOE^JOHN"), "0020000D") == [S1]
    assert _values(await _search(client, "/studies", **{"00100020": "P2"}), "0020000D") == [S2]
    assert _values(await _search(client, "/studies", PatientID="P?"), "0020000D") == [S2, S1, S3]


async def test_date_ranges(client: httpx.AsyncClient, three_studies: None) -> None:
    assert _values(await _search(client, "/studies", StudyDate="20200101-20201231"), "0020000D") == [S1]
    assert _values(await _search(client, "/studies", StudyDate="20200101-"), "0020000D") == [S2, S1]
    assert _values(await _search(client, "/studies", StudyDate="-20200101"), "0020000D") == [S3]


async def test_uid_lists_with_commas_or_backslashes(client: httpx.AsyncClient, three_studies: None) -> None:
    by_comma = await _search(client, "/studies", StudyInstanceUID=f"{S1},{S3}")
    by_backslash = await _search(client, "/studies", StudyInstanceUID=f"{S1}\\{S3}")
    assert sorted(_values(by_comma, "0020000D")) == [S1, S3]
    assert sorted(_values(by_backslash, "0020000D")) == [S1, S3]


async def test_includefield_by_tag_keyword_list_and_all(
    client: httpx.AsyncClient, three_studies: None
) -> None:
    [plain] = await _search(client, "/studies", PatientID="P1")
    assert "00081080" not in plain
    [by_keyword] = await _search(client, "/studies", PatientID="P1", includefield="PatientComments")
    assert _value(by_keyword, "00104000") == "first"
    response = await client.get(
        "/dicom-web/studies",
        params=[("PatientID", "P1"), ("includefield", "00104000,AdmittingDiagnosesDescription")],
    )
    [listed] = response.json()
    assert _value(listed, "00104000") == "first"
    assert _value(listed, "00081080") == "COUGH"
    [everything] = await _search(client, "/studies", PatientID="P1", includefield="all")
    assert _value(everything, "00081080") == "COUGH"
    assert everything["00081190"]["Value"] == [f"{BASE}/studies/{S1}"]


async def test_limit_offset_and_the_truncation_warning(
    client: httpx.AsyncClient, three_studies: None
) -> None:
    first = await client.get("/dicom-web/studies", params={"limit": 2})
    assert first.status_code == 200
    assert len(first.json()) == 2
    warning = first.headers["warning"]
    assert warning.startswith('299 dicomweb-api: "The number of results exceeded')
    assert "Additional results can be requested" in warning
    rest = await client.get("/dicom-web/studies", params={"limit": 2, "offset": 2})
    assert rest.status_code == 200
    assert len(rest.json()) == 1
    assert "warning" not in rest.headers
    seen = _values(first.json(), "0020000D") + _values(rest.json(), "0020000D")
    assert sorted(seen) == [S1, S2, S3]


async def test_fuzzy_matching_of_person_names(client: httpx.AsyncClient, three_studies: None) -> None:
    assert await _search(client, "/studies", PatientName="joh") == []
    fuzzy = await _search(client, "/studies", PatientName="joh", fuzzymatching="true")
    assert _values(fuzzy, "0020000D") == [S1]


async def test_no_match_is_an_empty_array(client: httpx.AsyncClient, three_studies: None) -> None:
    response = await client.get("/dicom-web/studies", params={"PatientID": "NOBODY"})
    assert response.status_code == 200
    assert response.json() == []


async def test_series_of_a_study_and_of_all_studies(client: httpx.AsyncClient, three_studies: None) -> None:
    series = await _search(client, f"/studies/{S1}/series")
    assert _values(series, "0020000E") == [f"{S1}.1", f"{S1}.2"]
    assert _values(series, "00080060") == ["CT", "SR"]
    assert _values(series, "00201209") == [2, 1]
    assert series[0]["00081190"]["Value"] == [f"{BASE}/studies/{S1}/series/{S1}.1"]
    assert "00400275" in series[0]
    assert "00100010" not in series[0]  # study attributes only for /series

    mr = await _search(client, "/series", Modality="MR")
    assert _values(mr, "0020000E") == [f"{S2}.1"]
    assert mr[0]["00100010"]["Value"] == [{"Alphabetic": "SMITH^ANN"}]  # study defaults included
    assert mr[0]["00081190"]["Value"] == [f"{BASE}/studies/{S2}/series/{S2}.1"]

    only_sr = await _search(client, f"/studies/{S1}/series", Modality="SR")
    assert _values(only_sr, "0020000E") == [f"{S1}.2"]


async def test_instances_at_every_path(client: httpx.AsyncClient, three_studies: None) -> None:
    of_series = await _search(client, f"/studies/{S1}/series/{S1}.1/instances")
    assert _values(of_series, "00080018") == [f"{S1}.1.1", f"{S1}.1.2"]
    assert _values(of_series, "00200013") == [1, 2]
    assert _values(of_series, "00080016") == ["1.2.840.10008.5.1.4.1.1.2"] * 2
    assert of_series[1]["00081190"]["Value"] == [f"{BASE}/studies/{S1}/series/{S1}.1/instances/{S1}.1.2"]
    assert "00080060" not in of_series[0]

    of_study = await _search(client, f"/studies/{S1}/instances")
    assert sorted(_values(of_study, "00080018")) == [f"{S1}.1.1", f"{S1}.1.2", f"{S1}.2.1"]
    assert "00080060" in of_study[0]  # series defaults included

    anywhere = await _search(client, "/instances", SOPInstanceUID=f"{S2}.1.1")
    assert _values(anywhere, "00080018") == [f"{S2}.1.1"]
    assert _value(anywhere[0], "00100020") == "P2"  # study defaults included
    assert anywhere[0]["00081190"]["Value"] == [f"{BASE}/studies/{S2}/series/{S2}.1/instances/{S2}.1.1"]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"NoSuchKeyword": "x"}, "unknown attribute"),
        ({"StudyDate": "2020-01-01"}, ""),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"limit": "0"}, "limit must be at least 1"),
        ({"offset": "-1"}, "offset must be at least 0"),
        ({"fuzzymatching": "maybe"}, "fuzzymatching must be true or false"),
        ({"includefield": "NotAnAttribute"}, "unknown attribute"),
    ],
)
async def test_invalid_parameters_are_400_with_a_reason(
    client: httpx.AsyncClient, params: dict[str, str], reason: str
) -> None:
    response = await client.get("/dicom-web/studies", params=params)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    assert reason in detail


async def test_json_must_be_acceptable(client: httpx.AsyncClient) -> None:
    response = await client.get("/dicom-web/studies", headers={"accept": "application/xml"})
    assert response.status_code == 406
    ok = await client.get("/dicom-web/studies", headers={"accept": "application/dicom+json"})
    assert ok.status_code == 200


async def test_sequence_paths_match_and_return_items(client: httpx.AsyncClient, store: Store) -> None:
    requested = []
    for number, procedure in ((1, "RP1"), (2, "RP2")):
        item = Dataset()
        item.RequestedProcedureID = procedure
        item.ScheduledProcedureStepID = f"SPS{number}"
        ds = dataset(S1, f"{S1}.{number}", f"{S1}.{number}.1", SeriesNumber=number)
        ds.RequestAttributesSequence = [item]
        requested.append(ds)
    await store(requested)
    found = await _search(
        client, f"/studies/{S1}/series", **{"RequestAttributesSequence.RequestedProcedureID": "RP2"}
    )
    assert _values(found, "0020000E") == [f"{S1}.2"]
    [item] = found[0]["00400275"]["Value"]
    assert item["00401001"]["Value"] == ["RP2"]
    assert item["00400009"]["Value"] == ["SPS2"]
    response = await client.get("/dicom-web/studies", params={"PatientName.CodeValue": "x"})
    assert response.status_code == 400
    assert "not a sequence" in response.json()["detail"]


@pytest.mark.parametrize(("roles", "status"), [(None, 401), ("viewer", 200)])
async def test_search_needs_the_read_permission(
    client: httpx.AsyncClient, roles: str | None, status: int
) -> None:
    request = client.build_request("GET", "/dicom-web/studies")
    del request.headers[ROLES_HEADER]
    if roles is not None:
        request.headers[ROLES_HEADER] = roles
    response = await client.send(request)
    assert response.status_code == status


async def test_the_ohif_study_list_request(client: httpx.AsyncClient, three_studies: None) -> None:
    response = await client.get(
        "/dicom-web/studies",
        params={
            "PatientName": "*oe*",
            "limit": "101",
            "offset": "0",
            "fuzzymatching": "false",
            "includefield": "00081030,00080060",
        },
        headers={"accept": "application/dicom+json, application/json;q=0.9, */*;q=0.1"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    assert "warning" not in response.headers
    studies = response.json()
    assert sorted(_values(studies, "0020000D")) == [S1, S3]
    by_uid = {_value(s, "0020000D"): s for s in studies}
    assert _value(by_uid[S1], "00081030") == "CHEST"
    assert by_uid[S1]["00080060"] == {"vr": "CS"}  # a series attribute: no single value for a study
