"""POST /v1/retrieve: the instances of a C-MOVE / C-GET / WADO request, and where they are."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from pacs_common.query.client import InvalidQueryError
from pacs_common.query.models import InformationModel, QueryLevel, RetrieveRequest
from query_service.testing import Service, dataset, index


def ui(*uids: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": list(uids)}


@pytest.fixture
async def two_patients(db_pool: asyncpg.Pool) -> None:
    await index(
        db_pool,
        [
            dataset("1.1", "1.1.2", "1.1.2.1", patient_id="PA", SeriesNumber=2, InstanceNumber=1),
            dataset("1.1", "1.1.1", "1.1.1.2", patient_id="PA", SeriesNumber=1, InstanceNumber=2),
            dataset("1.1", "1.1.1", "1.1.1.1", patient_id="PA", SeriesNumber=1, InstanceNumber=1),
            dataset("1.2", "1.2.1", "1.2.1.1", patient_id="PA", StudyDate="20250101"),
            dataset("1.3", "1.3.1", "1.3.1.1", patient_id="PB"),
        ],
    )


async def _sops(service: Service, level: QueryLevel, identifier: dict[str, Any], **options: Any) -> list[str]:
    instances = await service.client.retrieve(RetrieveRequest(level=level, identifier=identifier, **options))
    return [instance.sop_instance_uid for instance in instances]


@pytest.mark.usefixtures("two_patients")
async def test_retrieve_at_every_level(service: Service) -> None:
    study = await _sops(service, QueryLevel.STUDY, {"0020000D": ui("1.1")})
    assert study == ["1.1.1.1", "1.1.1.2", "1.1.2.1"]  # by series number, then instance number
    assert await _sops(service, QueryLevel.STUDY, {"0020000D": ui("1.1\\1.3")}) == [*study, "1.3.1.1"]
    assert await _sops(service, QueryLevel.SERIES, {"0020000E": ui("1.1.2", "1.2.1")}) == [
        "1.1.2.1",
        "1.2.1.1",
    ]
    assert await _sops(service, QueryLevel.IMAGE, {"00080018": ui("1.3.1.1", "1.1.1.2")}) == [
        "1.1.1.2",
        "1.3.1.1",
    ]
    # Unique keys above the level narrow the result when given.
    assert await _sops(service, QueryLevel.SERIES, {"0020000D": ui("1.3"), "0020000E": ui("1.1.2")}) == []
    patient = await _sops(
        service,
        QueryLevel.PATIENT,
        {"00100020": {"vr": "LO", "Value": ["PA"]}},
        information_model=InformationModel.PATIENT_ROOT,
    )
    assert sorted(patient) == sorted([*study, "1.2.1.1"])


@pytest.mark.usefixtures("two_patients")
async def test_retrieve_says_where_each_instance_is(service: Service) -> None:
    [instance] = await service.client.retrieve(
        RetrieveRequest(level=QueryLevel.IMAGE, identifier={"00080018": ui("1.3.1.1")})
    )
    assert (instance.study_instance_uid, instance.series_instance_uid) == ("1.3", "1.3.1")
    assert instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert instance.availability == "ONLINE"
    assert instance.location.tier == "hot" and instance.location.key == "1.3/1.3.1.1.dcm"
    assert instance.location.size > 0


@pytest.mark.usefixtures("two_patients")
@pytest.mark.parametrize(
    ("level", "identifier", "code"),
    [
        (QueryLevel.STUDY, {}, "invalid-identifier"),
        (QueryLevel.SERIES, {"0020000D": ui("1.1")}, "invalid-identifier"),
        (QueryLevel.STUDY, {"0020000D": ui("1.*")}, "invalid-identifier"),
        (QueryLevel.IMAGE, {"00080018": {"vr": "UI", "Value": ["not-a-uid"]}}, "invalid-identifier"),
        (QueryLevel.PATIENT, {"00100020": {"vr": "LO", "Value": ["PA"]}}, "invalid-level"),
    ],
)
async def test_malformed_retrieves_are_refused(
    service: Service, level: QueryLevel, identifier: dict[str, Any], code: str
) -> None:
    with pytest.raises(InvalidQueryError) as refused:
        await service.client.retrieve(RetrieveRequest(level=level, identifier=identifier))
    assert refused.value.code == code
    wildcard = {"00100020": {"vr": "LO", "Value": ["P*"]}}
    with pytest.raises(InvalidQueryError):
        await service.client.retrieve(
            RetrieveRequest(
                level=QueryLevel.PATIENT, identifier=wildcard, information_model=InformationModel.PATIENT_ROOT
            )
        )
