"""POST /v1/query against the real index: which entities a query returns, and
what each match carries."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from pydicom.dataset import Dataset

from pacs_common.query.client import InvalidQueryError
from pacs_common.query.models import InformationModel, QueryLevel, QueryRequest
from query_service.testing import Service, dataset, find_all, index, values

STUDY, SERIES, IMAGE, PATIENT = QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE, QueryLevel.PATIENT
PATIENT_ROOT = InformationModel.PATIENT_ROOT

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
PATIENT_NAME, PATIENT_ID = "00100010", "00100020"


def pn(value: str) -> dict[str, Any]:
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("="), strict=False))
    return {"vr": "PN", "Value": [{k: v for k, v in groups.items() if v}]}


def text(vr: str, *items: str) -> dict[str, Any]:
    return {"vr": vr, "Value": list(items)} if items else {"vr": vr}


async def studies(service: Service, identifier: dict[str, Any], **options: Any) -> list[str]:
    matches, _ = await find_all(service.client, QueryRequest(level=STUDY, identifier=identifier, **options))
    return sorted(values(matches, STUDY_UID))


def _study(n: int, **attributes: Any) -> Dataset:
    return dataset(f"1.2.{n}", f"1.2.{n}.1", f"1.2.{n}.1.1", **attributes)


@pytest.fixture
async def five_studies(db_pool: asyncpg.Pool) -> None:
    await index(
        db_pool,
        [
            _study(1, patient_id="P1", patient_name="SMITH^JOHN", StudyDate="20200115", StudyTime="101500",
                   AccessionNumber="A_1", modality="CT", StudyDescription="Chest"),
            _study(2, patient_id="P2", patient_name="Goldsmith^Anna", StudyDate="20201231", StudyTime="110059",
                   AccessionNumber="AB1", modality="MR", StudyDescription="Head"),
            _study(3, patient_id="P3", patient_name="Smithers^Bob", StudyDate="20210301", StudyTime="110100",
                   AccessionNumber="A%1", modality="US"),
            _study(4, patient_id="P4", patient_name="Jones^Tom", StudyDate="20190101", StudyTime="080000",
                   AccessionNumber="X9", modality="CT"),
            _study(5, patient_id="P1", patient_name="SMITH^JOHN", AccessionNumber="Y7", modality="MR"),
        ],
    )  # fmt: skip


@pytest.mark.usefixtures("five_studies")
async def test_patient_name_wildcards_are_case_insensitive(service: Service) -> None:
    assert await studies(service, {PATIENT_NAME: pn("smi*")}) == ["1.2.1", "1.2.3", "1.2.5"]
    assert await studies(service, {PATIENT_NAME: pn("*MIT*")}) == ["1.2.1", "1.2.2", "1.2.3", "1.2.5"]
    assert await studies(service, {PATIENT_NAME: pn("Smith^John")}) == ["1.2.1", "1.2.5"]
    assert await studies(service, {PATIENT_NAME: pn("Smith")}) == []  # single value: the whole name
    assert await studies(service, {PATIENT_NAME: pn("J?NES^*")}) == ["1.2.4"]


@pytest.mark.usefixtures("five_studies")
async def test_case_sensitive_person_names_on_request(service: Service) -> None:
    assert await studies(service, {PATIENT_NAME: pn("Smith*")}, case_insensitive_pn=False) == ["1.2.3"]
    assert await studies(service, {PATIENT_NAME: pn("SMITH*")}, case_insensitive_pn=False) == [
        "1.2.1",
        "1.2.5",
    ]


@pytest.mark.usefixtures("five_studies")
async def test_fuzzy_matching_matches_the_start_of_any_name_component(service: Service) -> None:
    assert await studies(service, {PATIENT_NAME: pn("ann")}, fuzzy_matching=True) == ["1.2.2"]
    assert await studies(service, {PATIENT_NAME: pn("jo sm")}, fuzzy_matching=True) == ["1.2.1", "1.2.5"]
    assert await studies(service, {PATIENT_NAME: pn("mith")}, fuzzy_matching=True) == []


@pytest.mark.usefixtures("five_studies")
async def test_single_values_are_exact_and_like_metacharacters_are_literal(service: Service) -> None:
    assert await studies(service, {"00080050": text("SH", "A_1")}) == ["1.2.1"]
    assert await studies(service, {"00080050": text("SH", "A%1")}) == ["1.2.3"]
    assert await studies(service, {"00080050": text("SH", "A_*")}) == ["1.2.1"]
    assert await studies(service, {"00080050": text("SH", "A?1")}) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await studies(service, {"00081030": text("LO", "chest")}) == []  # case-sensitive
    assert await studies(service, {PATIENT_ID: text("LO", "P1")}) == ["1.2.1", "1.2.5"]


@pytest.mark.usefixtures("five_studies")
async def test_date_and_time_ranges(service: Service) -> None:
    assert await studies(service, {"00080020": text("DA", "20200101-20201231")}) == ["1.2.1", "1.2.2"]
    assert await studies(service, {"00080020": text("DA", "-20201231")}) == ["1.2.1", "1.2.2", "1.2.4"]
    assert await studies(service, {"00080020": text("DA", "20200101-")}) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await studies(service, {"00080020": text("DA", "20190101")}) == ["1.2.4"]
    # An upper bound covers its precision: -1100 includes 11:00:59.
    assert await studies(service, {"00080030": text("TM", "-1100")}) == ["1.2.1", "1.2.2", "1.2.4"]
    assert await studies(service, {"00080030": text("TM", "1015-1100")}) == ["1.2.1", "1.2.2"]


@pytest.mark.usefixtures("five_studies")
async def test_invalid_dates_and_times_are_refused(service: Service) -> None:
    for identifier in ({"00080020": text("DA", "2020-13")}, {"00080030": text("TM", "2500")}):
        with pytest.raises(InvalidQueryError) as refused:
            await studies(service, identifier)
        assert refused.value.code == "invalid-identifier"


@pytest.mark.usefixtures("five_studies")
async def test_modalities_in_study_and_uid_lists(service: Service) -> None:
    assert await studies(service, {"00080061": text("CS", "MR")}) == ["1.2.2", "1.2.5"]
    assert await studies(service, {"00080061": text("CS", "US", "CT")}) == ["1.2.1", "1.2.3", "1.2.4"]
    assert await studies(service, {STUDY_UID: text("UI", "1.2.2\\1.2.4")}) == ["1.2.2", "1.2.4"]
    assert await studies(service, {STUDY_UID: text("UI", "1.2.3", "1.2.5")}) == ["1.2.3", "1.2.5"]


@pytest.mark.usefixtures("five_studies")
async def test_matches_carry_requested_and_unique_keys(service: Service) -> None:
    matches, completion = await find_all(
        service.client,
        QueryRequest(
            level=STUDY,
            identifier={
                PATIENT_ID: text("LO", "P2"),
                PATIENT_NAME: {"vr": "PN"},
                "00080020": {"vr": "DA"},
                "00081030": {"vr": "LO"},
                "00080061": {"vr": "CS"},
                "00201206": {"vr": "IS"},
                "00201208": {"vr": "IS"},
                "00080056": {"vr": "CS"},
                "00100030": {"vr": "DA"},  # no value stored: returned empty
                "00080005": {"vr": "CS"},
            },
        ),
    )
    assert completion.count == 1 and not completion.truncated
    assert matches == [
        {
            "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
            "00080020": {"vr": "DA", "Value": ["20201231"]},
            "00080056": {"vr": "CS", "Value": ["ONLINE"]},
            "00080061": {"vr": "CS", "Value": ["MR"]},
            "00081030": {"vr": "LO", "Value": ["Head"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Goldsmith^Anna"}]},
            "00100020": {"vr": "LO", "Value": ["P2"]},
            "00100030": {"vr": "DA"},
            "0020000D": {"vr": "UI", "Value": ["1.2.2"]},
            "00201206": {"vr": "IS", "Value": [1]},
            "00201208": {"vr": "IS", "Value": [1]},
        }
    ]
    plain, _ = await find_all(
        service.client, QueryRequest(level=STUDY, identifier={PATIENT_ID: text("LO", "P2")})
    )
    assert "00080005" not in plain[0]


async def test_hierarchical_queries_need_the_unique_keys_above(
    db_pool: asyncpg.Pool, service: Service
) -> None:
    await index(
        db_pool, [dataset("1.5", "1.5.1", "1.5.1.1"), dataset("1.6", "1.6.1", "1.6.1.1", modality="MR")]
    )
    refused: list[QueryRequest] = [
        QueryRequest(level=SERIES, identifier={}),
        QueryRequest(level=IMAGE, identifier={STUDY_UID: text("UI", "1.5")}),
        QueryRequest(level=SERIES, identifier={STUDY_UID: text("UI", "1.*")}),
        QueryRequest(level=STUDY, information_model=PATIENT_ROOT, identifier={}),
        QueryRequest(level=STUDY, information_model=PATIENT_ROOT, identifier={PATIENT_ID: text("LO", "P*")}),
    ]
    for request in refused:
        with pytest.raises(InvalidQueryError) as error:
            await find_all(service.client, request)
        assert error.value.code == "invalid-identifier"
    with pytest.raises(InvalidQueryError) as error:
        await find_all(service.client, QueryRequest(level=PATIENT, identifier={}))
    assert error.value.code == "invalid-level"

    series, _ = await find_all(
        service.client,
        QueryRequest(level=SERIES, identifier={STUDY_UID: text("UI", "1.6"), "00080060": {"vr": "CS"}}),
    )
    assert [(m[STUDY_UID]["Value"], m[SERIES_UID]["Value"], m["00080060"]["Value"]) for m in series] == [
        (["1.6"], ["1.6.1"], ["MR"])
    ]
    relational, _ = await find_all(
        service.client, QueryRequest(level=SERIES, identifier={"00080060": text("CS", "CT")}, relational=True)
    )
    assert values(relational, SERIES_UID) == ["1.5.1"]
    patient_root, _ = await find_all(
        service.client,
        QueryRequest(
            level=IMAGE,
            information_model=PATIENT_ROOT,
            identifier={
                PATIENT_ID: text("LO", "P1"),
                STUDY_UID: text("UI", "1.5"),
                SERIES_UID: text("UI", "1.5.1"),
            },
        ),
    )
    assert [(m[PATIENT_ID]["Value"], m[SOP_UID]["Value"]) for m in patient_root] == [(["P1"], ["1.5.1.1"])]


async def test_patient_level_with_computed_counts(db_pool: asyncpg.Pool, service: Service) -> None:
    await index(
        db_pool,
        [
            dataset("1.7", "1.7.1", "1.7.1.1", patient_id="PA"),
            dataset("1.7", "1.7.1", "1.7.1.2", patient_id="PA"),
            dataset("1.7", "1.7.2", "1.7.2.1", patient_id="PA"),
            dataset("1.8", "1.8.1", "1.8.1.1", patient_id="PA"),
            dataset("1.9", "1.9.1", "1.9.1.1", patient_id="PB"),
        ],
    )
    matches, _ = await find_all(
        service.client,
        QueryRequest(
            level=PATIENT,
            information_model=PATIENT_ROOT,
            identifier={
                PATIENT_ID: text("LO", "PA"),
                "00201200": {"vr": "IS"},
                "00201202": {"vr": "IS"},
                "00201204": {"vr": "IS"},
            },
        ),
    )
    assert [(m["00201200"]["Value"], m["00201202"]["Value"], m["00201204"]["Value"]) for m in matches] == [
        ([2], [3], [4])
    ]


async def test_series_and_image_levels(db_pool: asyncpg.Pool, service: Service) -> None:
    request_attributes = Dataset()
    request_attributes.RequestedProcedureID = "RP-7"
    request_attributes.ScheduledProcedureStepID = "SPS-1"
    await index(
        db_pool,
        [
            dataset("1.3", "1.3.2", "1.3.2.1", SeriesNumber=2, InstanceNumber=1, SeriesTime="101010",
                    RequestAttributesSequence=[request_attributes], ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]),
            dataset("1.3", "1.3.1", "1.3.1.2", SeriesNumber=1, InstanceNumber=2, ImageType=["DERIVED", "SECONDARY"]),
            dataset("1.3", "1.3.1", "1.3.1.1", SeriesNumber=1, InstanceNumber=1, ImageType=["ORIGINAL", "PRIMARY"]),
        ],
    )  # fmt: skip
    study = {STUDY_UID: text("UI", "1.3")}
    all_series, _ = await find_all(
        service.client, QueryRequest(level=SERIES, identifier=study | {"00201209": {"vr": "IS"}})
    )
    assert values(all_series, SERIES_UID) == ["1.3.1", "1.3.2"]  # by series number
    assert values(all_series, "00201209") == [2, 1]
    # Sequence matching on Request Attributes Sequence.
    sequence = {"vr": "SQ", "Value": [{"00401001": text("SH", "RP-*")}]}
    matched, _ = await find_all(
        service.client, QueryRequest(level=SERIES, identifier=study | {"00400275": sequence})
    )
    assert values(matched, SERIES_UID) == ["1.3.2"]
    assert matched[0]["00400275"]["Value"] == [{"00401001": {"vr": "SH", "Value": ["RP-7"]}}]
    no_match = {"vr": "SQ", "Value": [{"00401001": text("SH", "RP-8")}]}
    unmatched, _ = await find_all(
        service.client, QueryRequest(level=SERIES, identifier=study | {"00400275": no_match})
    )
    assert unmatched == []

    images, _ = await find_all(
        service.client,
        QueryRequest(
            level=IMAGE, identifier=study | {SERIES_UID: text("UI", "1.3.1"), "00200013": {"vr": "IS"}}
        ),
    )
    assert values(images, SOP_UID) == ["1.3.1.1", "1.3.1.2"]
    assert values(images, "00200013") == [1, 2]
    # A multi-valued attribute matches when any of its values does.
    primary, _ = await find_all(
        service.client,
        QueryRequest(level=IMAGE, identifier={"00080008": text("CS", "PRIMARY")}, relational=True),
    )
    assert sorted(values(primary, SOP_UID)) == ["1.3.1.1", "1.3.2.1"]
    assert primary[0]["00080008"]["Value"][:2] == ["ORIGINAL", "PRIMARY"]


async def test_attributes_not_indexed_match_and_return_from_the_metadata(
    db_pool: asyncpg.Pool, service: Service
) -> None:
    procedure = Dataset()
    procedure.CodeValue = "CTHEAD"
    procedure.CodingSchemeDesignator = "LOCAL"
    await index(
        db_pool,
        [
            dataset("1.4", "1.4.1", "1.4.1.1", AdmittingDiagnosesDescription="Headache",
                    ProcedureCodeSequence=[procedure], PatientBirthTime="0730"),
            dataset("1.5", "1.5.1", "1.5.1.1", AdmittingDiagnosesDescription="Fracture"),
        ],
    )  # fmt: skip
    assert await studies(service, {"00081080": text("LO", "Head*")}) == ["1.4"]
    code = {"vr": "SQ", "Value": [{"00080100": text("SH", "CTHEAD")}]}
    assert await studies(service, {"00081032": code}) == ["1.4"]
    assert await studies(service, {"00100032": text("TM", "0700-0800")}) == ["1.4"]
    matches, _ = await find_all(
        service.client,
        QueryRequest(level=STUDY, identifier={"00081080": {"vr": "LO"}, STUDY_UID: text("UI", "1.5")}),
    )
    assert matches[0]["00081080"] == {"vr": "LO", "Value": ["Fracture"]}
    everything, _ = await find_all(
        service.client, QueryRequest(level=STUDY, identifier={STUDY_UID: text("UI", "1.4")}, include_all=True)
    )
    assert everything[0]["00081080"]["Value"] == ["Headache"]
    assert "00080018" not in everything[0]  # SOP Instance UID is not a study attribute
    assert "00080005" not in everything[0]


async def test_paging_is_deterministic_and_capped(db_pool: asyncpg.Pool) -> None:
    from query_service.testing import query_settings, start_service

    await index(
        db_pool,
        [
            _study(n, StudyDate=f"2020{n:02d}01", AdmittingDiagnosesDescription=f"Dx {n % 2}")
            for n in range(1, 8)
        ],
    )
    async with start_service(db_pool, query_settings(max_matches=5, fetch_size=2)) as service:
        first, done = await find_all(service.client, QueryRequest(level=STUDY, limit=3))
        assert values(first, STUDY_UID) == ["1.2.7", "1.2.6", "1.2.5"]  # newest first
        assert done.truncated and done.max_matches == 3 and done.count == 3
        rest, done = await find_all(service.client, QueryRequest(level=STUDY, offset=3, limit=10))
        assert values(rest, STUDY_UID) == ["1.2.4", "1.2.3", "1.2.2", "1.2.1"]
        assert not done.truncated and done.max_matches is None
        capped, done = await find_all(service.client, QueryRequest(level=STUDY))
        assert len(capped) == 5 and done.truncated and done.max_matches == 5
        # Paging also holds when a key is matched in Python (not indexed).
        filtered, done = await find_all(
            service.client,
            QueryRequest(level=STUDY, identifier={"00081080": text("LO", "Dx 1")}, offset=1, limit=2),
        )
        assert values(filtered, STUDY_UID) == ["1.2.5", "1.2.3"] and done.truncated
        last, done = await find_all(
            service.client,
            QueryRequest(level=STUDY, identifier={"00081080": text("LO", "Dx 1")}, offset=3, limit=2),
        )
        assert values(last, STUDY_UID) == ["1.2.1"] and not done.truncated
        not_indexed = {"00180015": text("CS", "HEAD")}  # BodyPartExamined: a series key, ignored at STUDY
        assert (
            len((await find_all(service.client, QueryRequest(level=STUDY, identifier=not_indexed)))[0]) == 5
        )
