"""The rules that choose which of a patient's remote studies to prefetch."""

from __future__ import annotations

import random
from datetime import date

import pytest

from prefetch_scheduler.prefetch.models import RemoteStudy
from prefetch_scheduler.prefetch.runner import backoff_seconds
from prefetch_scheduler.prefetch.selection import (
    PriorCriteria,
    body_part_of_item,
    choose_priors,
    parse_dicom_date,
)
from prefetch_scheduler.prefetch.settings import PrefetchSettings


def study(
    uid: str, day: str | None, *modalities: str, description: str = "", source: str = "A"
) -> RemoteStudy:
    return RemoteStudy(
        study_instance_uid=uid, source=source, study_date=day, modalities=modalities, description=description
    )


def uids(studies: list[RemoteStudy]) -> list[str]:
    return [s.study_instance_uid for s in studies]


def test_same_modality_first_then_newest_at_most_n() -> None:
    candidates = [
        study("mr-2024", "20240101", "MR"),
        study("ct-2019", "20190101", "CT"),
        study("ct-2023", "20230101", "CT", "SR"),
        study("xr-2025", "20250101", "CR"),
        study("ct-2021", "20210101", "CT"),
    ]
    chosen = choose_priors(candidates, PriorCriteria(modality="CT", max_studies=4))
    assert uids(chosen) == ["ct-2023", "ct-2021", "ct-2019", "xr-2025"]
    assert uids(choose_priors(candidates, PriorCriteria(modality="CT", max_studies=2))) == [
        "ct-2023",
        "ct-2021",
    ]
    # Without a preference: simply the newest.
    plain = PriorCriteria(modality="CT", max_studies=2, prefer_same_modality=False)
    assert uids(choose_priors(candidates, plain)) == ["xr-2025", "mr-2024"]


def test_lookback_excludes_older_and_undated_studies() -> None:
    candidates = [
        study("old", "20100101", "CT"),
        study("new", "20240101", "CT"),
        study("undated", None, "CT"),
    ]
    chosen = choose_priors(candidates, PriorCriteria(earliest=date(2020, 1, 1), max_studies=10))
    assert uids(chosen) == ["new"]
    # No lookback: every study, the undated one last.
    assert uids(choose_priors(candidates, PriorCriteria(max_studies=10))) == ["new", "old", "undated"]


def test_scheduled_study_and_duplicates_across_sources_are_left_out() -> None:
    candidates = [
        study("scheduled", "20250101", "CT"),
        study("prior", "20240101", "CT", source="A"),
        study("prior", "20240101", "CT", source="B"),
    ]
    chosen = choose_priors(candidates, PriorCriteria(exclude_study_uid="scheduled", max_studies=10))
    assert uids(chosen) == ["prior"]
    assert chosen[0].source == "A"


def test_body_part_from_attribute_or_description() -> None:
    chest_attr = RemoteStudy(
        study_instance_uid="chest-attr",
        source="A",
        study_date="20200101",
        modalities=("CT",),
        body_part="chest",
    )
    candidates = [
        study("head", "20240101", "CT", description="CT HEAD W/O"),
        study("chest-desc", "20210101", "CT", description="CT Chest with contrast"),
        chest_attr,
        study("chest-mr", "20230101", "MR", description="MR CHEST"),
        study("chestnut", "20250101", "CT", description="CHESTNUT phantom"),  # not the word CHEST
    ]
    criteria = PriorCriteria(modality="CT", body_part="CHEST", max_studies=10)
    # Same modality and body part, then same modality, then same body part only.
    assert uids(choose_priors(candidates, criteria)) == [
        "chest-desc",
        "chest-attr",
        "chestnut",
        "head",
        "chest-mr",
    ]


def test_body_part_of_a_worklist_item() -> None:
    top = {"00180015": {"vr": "CS", "Value": ["CHEST"]}}
    in_step = {"00400100": {"vr": "SQ", "Value": [{"00180015": {"vr": "CS", "Value": ["KNEE"]}}]}}
    assert body_part_of_item(top) == "CHEST"
    assert body_part_of_item(in_step) == "KNEE"
    assert body_part_of_item({"00100020": {"vr": "LO", "Value": ["P"]}}) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20240229", date(2024, 2, 29)),
        ("2024.02.01", date(2024, 2, 1)),
        ("20230230", None),
        ("", None),
        ("2024", None),
    ],
)
def test_dicom_dates(text: str, expected: date | None) -> None:
    assert parse_dicom_date(text) == expected


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 10.0), (2, 20.0), (3, 40.0), (10, 60.0)):
        for _ in range(20):
            delay = backoff_seconds(attempt, 10.0, 60.0, rng)
            assert ceiling / 2 <= delay <= ceiling


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_PREFETCH_SOURCES", "ORTHANC, OTHER ,ORTHANC")
    monkeypatch.setenv("PACS_GATEWAY_AE_TITLE", "MYPACS")
    monkeypatch.setenv("PACS_PREFETCH_LOOKBACK_YEARS", "2")
    monkeypatch.setenv("PACS_PREFETCH_LOOKBACK_DAYS", "10")
    settings = PrefetchSettings()
    assert settings.sources == ["ORTHANC", "OTHER"]
    assert (settings.move_destination, settings.calling_ae) == ("MYPACS", "MYPACS")
    assert settings.lookback is not None and settings.lookback.days == 2 * 365 + 10
    monkeypatch.setenv("PACS_PREFETCH_MOVE_DESTINATION", "GW")
    assert PrefetchSettings().move_destination == "GW"
    monkeypatch.setenv("PACS_PREFETCH_SOURCES", "A\\B")
    with pytest.raises(ValueError, match="AE title"):
        PrefetchSettings()
