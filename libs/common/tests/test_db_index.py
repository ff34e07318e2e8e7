"""InstanceIndex against the real PostgreSQL: the hierarchy, aggregates,
idempotency, both duplicate policies, concurrent writers, study.stable claims."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacs_common.db.index import IndexItem, IndexResult, InstanceIndex, StableStudy
from pacs_common.dicom.metadata import ParsedInstance, parse_for_index
from pacs_common.messaging.models import StorageLocation
from pacs_common.settings import DuplicatePolicy

KEEP_FIRST = DuplicatePolicy.KEEP_FIRST
REPLACE = DuplicatePolicy.REPLACE
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _path(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(path)


def _location(key: str, content: bytes) -> StorageLocation:
    return StorageLocation(
        tier="hot",
        backend="filesystem",
        key=key,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )


def file_item(name: str, *, received_at: datetime = T0) -> IndexItem:
    data = _path(name).read_bytes()
    parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=1024)
    return IndexItem.build(parsed, _location(name, data), received_at, "MODALITY")


_TEMPLATE: list[ParsedInstance] = []  # parsed once, on first use


def synthetic_item(
    study: str,
    series: str,
    sop: str,
    *,
    patient_id: str = "P1",
    modality: str = "CT",
    sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
    content: bytes | None = None,
    received_at: datetime = T0,
    description: str | None = None,
) -> IndexItem:
    """An instance cloned from CT_small's header under the given UIDs."""
    if not _TEMPLATE:
        _TEMPLATE.append(file_item("CT_small.dcm").parsed)
    parsed = copy.deepcopy(_TEMPLATE[0])
    parsed.patient.patient_id = patient_id
    parsed.study.study_instance_uid = study
    parsed.series.series_instance_uid = series
    parsed.series.modality = modality
    parsed.instance.sop_instance_uid = sop
    parsed.instance.sop_class_uid = sop_class
    if description is not None:
        parsed.study.study_description = description
        parsed.metadata["00081030"] = {"vr": "LO", "Value": [description]}
    parsed.metadata["00080018"] = {"vr": "UI", "Value": [sop]}
    body = content if content is not None else sop.encode()
    digest = hashlib.sha256(body).hexdigest()
    location = _location(f"{study}/{series}/{sop}.{digest[:8]}.dcm", body)
    return IndexItem.build(parsed, location, received_at, "MODALITY")


async def _count(pool: asyncpg.Pool, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table}"))


async def _study(pool: asyncpg.Pool, uid: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM study WHERE study_instance_uid = $1", uid)
    assert row is not None
    return row


def _outcomes(results: Sequence[IndexResult]) -> list[str]:
    return [r.outcome for r in results]


# -- the hierarchy ---------------------------------------------------------------


async def test_hierarchy_from_real_files(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    items = [file_item("CT_small.dcm"), file_item("MR_small.dcm")]
    results = await index.index_batch(items, duplicate_policy=KEEP_FIRST)
    assert _outcomes(results) == ["created", "created"]

    for item, name in zip(items, ("CT_small.dcm", "MR_small.dcm"), strict=True):
        ds = pydicom.dcmread(_path(name), stop_before_pixels=True)
        row = await db_pool.fetchrow(
            """
            SELECT p.patient_id, p.patient_name, p.patient_name_norm, p.patient_birth_date, p.patient_sex,
                   st.study_instance_uid, st.study_date, st.study_time, st.accession_number,
                   st.referring_physician_name, st.study_id, st.study_description,
                   se.series_instance_uid, se.modality, se.series_number, se.source_ae_title,
                   i.sop_instance_uid, i.sop_class_uid, i.instance_number, i.rows, i.columns,
                   i.bits_allocated, i.transfer_syntax_uid, i.content_sha256, i.received_at,
                   l.tier, l.backend, l.key, l.size, l.sha256, m.metadata, m.bulk_data
            FROM instance i
            JOIN series se ON se.pk = i.series_fk
            JOIN study st ON st.pk = se.study_fk
            JOIN patient p ON p.pk = st.patient_fk
            JOIN instance_location l ON l.instance_fk = i.pk
            JOIN instance_metadata m ON m.instance_fk = i.pk
            WHERE i.sop_instance_uid = $1
            """,
            ds.SOPInstanceUID,
        )
        assert row is not None
        assert row["patient_id"] == ds.PatientID
        assert row["patient_name"] == str(ds.PatientName)
        assert row["patient_name_norm"] == str(ds.PatientName).upper()
        assert row["patient_birth_date"] == (ds.get("PatientBirthDate") or None)
        assert row["patient_sex"] == (ds.get("PatientSex") or None)
        assert row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["study_date"] == ds.StudyDate
        assert row["study_time"] == (ds.get("StudyTime") or None)
        assert row["accession_number"] == (ds.get("AccessionNumber") or None)
        assert row["study_id"] == (ds.get("StudyID") or None)
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert row["modality"] == ds.Modality
        assert row["series_number"] == (int(ds.SeriesNumber) if "SeriesNumber" in ds else None)
        assert row["source_ae_title"] == "MODALITY"
        assert row["sop_class_uid"] == ds.SOPClassUID
        assert row["instance_number"] == int(ds.InstanceNumber)
        assert (row["rows"], row["columns"], row["bits_allocated"]) == (ds.Rows, ds.Columns, ds.BitsAllocated)
        assert row["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
        assert row["content_sha256"] == row["sha256"] == item.location.sha256
        assert (row["tier"], row["backend"], row["key"], row["size"]) == (
            "hot",
            "filesystem",
            name,
            _path(name).stat().st_size,
        )
        assert row["received_at"] == T0
        assert row["metadata"] == item.parsed.metadata  # jsonb comes back as a dict
        assert row["metadata"]["0020000D"]["Value"] == [ds.StudyInstanceUID]
        assert row["bulk_data"]["7FE00010"]["offset"] > 0

        study = await _study(db_pool, ds.StudyInstanceUID)
        assert study["number_of_study_related_series"] == 1
        assert study["number_of_study_related_instances"] == 1
        assert study["modalities_in_study"] == [ds.Modality]
        assert study["sop_classes_in_study"] == [ds.SOPClassUID]
        assert study["study_size_bytes"] == _path(name).stat().st_size
        assert study["last_received_at"] == T0
        assert study["last_indexed_at"] is not None


async def test_empty_batch(db_pool: asyncpg.Pool) -> None:
    assert await InstanceIndex(db_pool).index_batch([], duplicate_policy=KEEP_FIRST) == []


async def test_aggregates_after_several_batches(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    study = "1.2.3.100"
    ct, pr = "1.2.3.100.1", "1.2.3.100.2"
    batch1 = [synthetic_item(study, ct, f"{ct}.{n}") for n in range(5)]
    batch2 = [synthetic_item(study, ct, f"{ct}.{n}") for n in range(5, 8)] + [
        synthetic_item(study, pr, f"{pr}.1", modality="PR", sop_class="1.2.840.10008.5.1.4.1.1.11.1")
    ]
    batch3 = [synthetic_item("1.2.3.200", "1.2.3.200.1", "1.2.3.200.1.1", modality="MR", patient_id="P2")]
    for batch in (batch1, batch2, batch3):
        await index.index_batch(batch, duplicate_policy=KEEP_FIRST)

    row = await _study(db_pool, study)
    assert row["number_of_study_related_series"] == 2
    assert row["number_of_study_related_instances"] == 9
    assert row["modalities_in_study"] == ["CT", "PR"]
    assert row["sop_classes_in_study"] == ["1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.2"]
    assert row["study_size_bytes"] == sum(i.location.size for i in batch1 + batch2)
    series = {
        r["series_instance_uid"]: r["number_of_series_related_instances"]
        for r in await db_pool.fetch("SELECT * FROM series")
    }
    assert series == {ct: 8, pr: 1, "1.2.3.200.1": 1}
    assert await _count(db_pool, "patient") == 2
    other = await _study(db_pool, "1.2.3.200")
    assert (other["number_of_study_related_instances"], other["modalities_in_study"]) == (1, ["MR"])


async def test_newest_arrival_sets_study_attributes(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    later = synthetic_item(
        "1.2.5", "1.2.5.1", "1.2.5.1.2", received_at=T0 + timedelta(minutes=1), description="NEW"
    )
    earlier = synthetic_item("1.2.5", "1.2.5.1", "1.2.5.1.1", received_at=T0, description="OLD")
    await index.index_batch([later], duplicate_policy=KEEP_FIRST)
    await index.index_batch([earlier], duplicate_policy=KEEP_FIRST)  # arrives late: does not win
    row = await _study(db_pool, "1.2.5")
    assert row["study_description"] == "NEW"
    assert row["last_received_at"] == T0 + timedelta(minutes=1)
    assert row["number_of_study_related_instances"] == 2


# -- idempotency -------------------------------------------------------------------


async def test_redelivery_changes_nothing(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    batch = [synthetic_item("1.2.6", "1.2.6.1", f"1.2.6.1.{n}") for n in range(10)]
    assert set(_outcomes(await index.index_batch(batch, duplicate_policy=KEEP_FIRST))) == {"created"}
    before = await _study(db_pool, "1.2.6")
    counts = {
        t: await _count(db_pool, t) for t in ("patient", "study", "series", "instance", "instance_location")
    }

    again = await index.index_batch(batch, duplicate_policy=KEEP_FIRST)
    assert _outcomes(again) == ["unchanged"] * 10
    assert [r.location for r in again] == [i.location for i in batch]
    after = await _study(db_pool, "1.2.6")
    assert {t: await _count(db_pool, t) for t in counts} == counts
    assert after["number_of_study_related_instances"] == 10
    # Nothing was written: the study is not touched, so study.stable is not re-announced.
    assert after["updated_at"] == before["updated_at"]
    assert after["last_indexed_at"] == before["last_indexed_at"]
    assert await _count(db_pool, "instance_superseded") == 0


async def test_same_instance_twice_in_one_batch(db_pool: asyncpg.Pool) -> None:
    item = synthetic_item("1.2.7", "1.2.7.1", "1.2.7.1.1")
    results = await InstanceIndex(db_pool).index_batch([item, item], duplicate_policy=KEEP_FIRST)
    assert _outcomes(results) == ["created", "unchanged"]
    assert await _count(db_pool, "instance") == 1


# -- duplicates -------------------------------------------------------------------


async def _indexed(pool: asyncpg.Pool, sop: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        """
        SELECT i.content_sha256, i.received_at, l.key, l.sha256, m.metadata
        FROM instance i JOIN instance_location l ON l.instance_fk = i.pk
        JOIN instance_metadata m ON m.instance_fk = i.pk
        WHERE i.sop_instance_uid = $1
        """,
        sop,
    )
    assert row is not None
    return row


async def _superseded(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM instance_superseded ORDER BY pk")
    return [dict(r) for r in rows]


async def test_keep_first(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    sop = "1.2.8.1.1"
    first = synthetic_item("1.2.8", "1.2.8.1", sop, content=b"first", description="FIRST")
    second = synthetic_item(
        "1.2.8",
        "1.2.8.1",
        sop,
        content=b"second",
        description="SECOND",
        received_at=T0 + timedelta(minutes=5),
    )
    await index.index_batch([first], duplicate_policy=KEEP_FIRST)
    [result] = await index.index_batch([second], duplicate_policy=KEEP_FIRST)
    assert result.outcome == "kept-first"
    assert result.location == first.location
    assert result.duplicate is not None
    assert result.duplicate.decision == "kept-first"
    assert result.duplicate.kept == first.location
    assert result.duplicate.set_aside == second.location

    row = await _indexed(db_pool, sop)
    assert (row["key"], row["content_sha256"]) == (first.location.key, first.location.sha256)
    assert row["metadata"]["00081030"]["Value"] == ["FIRST"]
    assert (await _study(db_pool, "1.2.8"))["study_description"] == "FIRST"
    [aside] = await _superseded(db_pool)
    assert aside["decision"] == "kept-first"
    assert (aside["key"], aside["sha256"]) == (second.location.key, second.location.sha256)
    assert (aside["kept_key"], aside["kept_sha256"]) == (first.location.key, first.location.sha256)

    # Redelivery of both: nothing new.
    results = await index.index_batch([second, first], duplicate_policy=KEEP_FIRST)
    assert _outcomes(results) == ["unchanged", "unchanged"]
    assert len(await _superseded(db_pool)) == 1
    assert (await _study(db_pool, "1.2.8"))["number_of_study_related_instances"] == 1


async def test_keep_first_follows_arrival_not_processing_order(db_pool: asyncpg.Pool) -> None:
    """Two workers: the later arrival may be indexed first; the earlier one
    still ends up indexed, and the later one set aside."""
    index = InstanceIndex(db_pool)
    sop = "1.2.8.2.1"
    earlier = synthetic_item("1.2.8", "1.2.8.2", sop, content=b"earlier", received_at=T0)
    later = synthetic_item("1.2.8", "1.2.8.2", sop, content=b"later", received_at=T0 + timedelta(seconds=1))
    await index.index_batch([later], duplicate_policy=KEEP_FIRST)
    [result] = await index.index_batch([earlier], duplicate_policy=KEEP_FIRST)
    assert result.outcome == "replaced"
    assert result.duplicate is not None
    assert (result.duplicate.decision, result.duplicate.set_aside) == ("kept-first", later.location)
    assert (await _indexed(db_pool, sop))["key"] == earlier.location.key
    assert [(s["decision"], s["key"]) for s in await _superseded(db_pool)] == [
        ("kept-first", later.location.key)
    ]
    # Redeliveries change nothing now.
    results = await index.index_batch([later, earlier], duplicate_policy=KEEP_FIRST)
    assert _outcomes(results) == ["unchanged", "unchanged"]
    assert (await _indexed(db_pool, sop))["key"] == earlier.location.key


async def test_replace(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    sop = "1.2.9.1.1"
    first = synthetic_item("1.2.9", "1.2.9.1", sop, content=b"first", description="FIRST")
    second = synthetic_item(
        "1.2.9",
        "1.2.9.1",
        sop,
        content=b"second-longer",
        description="SECOND",
        received_at=T0 + timedelta(minutes=5),
    )
    await index.index_batch([first], duplicate_policy=REPLACE)
    [result] = await index.index_batch([second], duplicate_policy=REPLACE)
    assert result.outcome == "replaced"
    assert result.location == second.location
    assert result.duplicate is not None and result.duplicate.set_aside == first.location

    row = await _indexed(db_pool, sop)
    assert (row["key"], row["content_sha256"]) == (second.location.key, second.location.sha256)
    assert row["metadata"]["00081030"]["Value"] == ["SECOND"]
    assert row["received_at"] == second.received_at
    study = await _study(db_pool, "1.2.9")
    assert study["study_description"] == "SECOND"
    assert study["number_of_study_related_instances"] == 1
    assert study["study_size_bytes"] == second.location.size
    [aside] = await _superseded(db_pool)
    assert (aside["decision"], aside["key"]) == ("replaced", first.location.key)

    # A late redelivery of the first message does not flip the index back.
    [late] = await index.index_batch([first], duplicate_policy=REPLACE)
    assert late.outcome == "unchanged"
    assert (await _indexed(db_pool, sop))["key"] == second.location.key
    assert len(await _superseded(db_pool)) == 1

    # The first content sent again, later: newest wins again.
    resent = IndexItem.build(first.parsed, first.location, T0 + timedelta(minutes=9), "MODALITY")
    [back] = await index.index_batch([resent], duplicate_policy=REPLACE)
    assert back.outcome == "replaced"
    assert (await _indexed(db_pool, sop))["key"] == first.location.key
    assert [(s["decision"], s["key"]) for s in await _superseded(db_pool)] == [
        ("replaced", second.location.key)
    ]


async def test_replace_within_one_batch(db_pool: asyncpg.Pool) -> None:
    sop = "1.2.10.1.1"
    old = synthetic_item("1.2.10", "1.2.10.1", sop, content=b"old")
    new = synthetic_item("1.2.10", "1.2.10.1", sop, content=b"new", received_at=T0 + timedelta(seconds=1))
    results = await InstanceIndex(db_pool).index_batch([new, old], duplicate_policy=REPLACE)
    # Taken in arrival order: old is created, new replaces it.
    assert _outcomes(results) == ["replaced", "created"]
    assert (await _indexed(db_pool, sop))["key"] == new.location.key


async def test_replace_into_another_series(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    sop = "1.2.11.1.1"
    await index.index_batch(
        [synthetic_item("1.2.11", "1.2.11.1", sop, content=b"a")], duplicate_policy=REPLACE
    )
    moved = synthetic_item("1.2.12", "1.2.12.1", sop, content=b"b", received_at=T0 + timedelta(seconds=1))
    [result] = await index.index_batch([moved], duplicate_policy=REPLACE)
    assert result.outcome == "replaced"
    assert await db_pool.fetchval("SELECT count(*) FROM series WHERE series_instance_uid = '1.2.11.1'") == 0
    assert await db_pool.fetchval("SELECT count(*) FROM study WHERE study_instance_uid = '1.2.11'") == 0
    assert (await _study(db_pool, "1.2.12"))["number_of_study_related_instances"] == 1


async def test_identical_content_at_another_location_is_recorded(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    item = synthetic_item("1.2.13", "1.2.13.1", "1.2.13.1.1", content=b"same")
    copy_elsewhere = IndexItem.build(
        item.parsed, item.location.model_copy(update={"key": "elsewhere.dcm"}), T0, "MODALITY"
    )
    await index.index_batch([item], duplicate_policy=KEEP_FIRST)
    [result] = await index.index_batch([copy_elsewhere], duplicate_policy=KEEP_FIRST)
    assert result.outcome == "unchanged"
    assert result.duplicate is not None and result.duplicate.decision == "identical"
    [aside] = await _superseded(db_pool)
    assert (aside["decision"], aside["key"]) == ("identical", "elsewhere.dcm")


# -- concurrency ------------------------------------------------------------------


@pytest.mark.parametrize("policy", [KEEP_FIRST, REPLACE])
async def test_concurrent_writers_overlapping_studies(db_pool: asyncpg.Pool, policy: DuplicatePolicy) -> None:
    """Eight tasks, each on its own connection, index shuffled batches over
    the same three studies, with every instance delivered twice."""
    index = InstanceIndex(db_pool)
    rng = random.Random(7)
    studies = [f"1.2.20.{s}" for s in range(3)]
    items = [
        synthetic_item(study, f"{study}.{se}", f"{study}.{se}.{n}", patient_id=f"P{s % 2}")
        for s, study in enumerate(studies)
        for se in range(2)
        for n in range(40)
    ]
    deliveries = items + items
    rng.shuffle(deliveries)
    batches = [deliveries[i : i + 25] for i in range(0, len(deliveries), 25)]
    results = await asyncio.gather(*(index.index_batch(b, duplicate_policy=policy) for b in batches))
    outcomes = [r.outcome for batch in results for r in batch]
    assert outcomes.count("created") == len(items)
    assert outcomes.count("unchanged") == len(items)
    assert await _count(db_pool, "instance") == len(items)
    assert await _count(db_pool, "instance_location") == len(items)
    assert await _count(db_pool, "instance_metadata") == len(items)
    assert await _count(db_pool, "series") == 6
    assert await _count(db_pool, "patient") == 2
    for study in studies:
        row = await _study(db_pool, study)
        assert row["number_of_study_related_series"] == 2
        assert row["number_of_study_related_instances"] == 80
    assert set(
        await db_pool.fetchval("SELECT array_agg(DISTINCT number_of_series_related_instances) FROM series")
    ) == {40}


async def test_concurrent_conflicting_duplicates(db_pool: asyncpg.Pool) -> None:
    """Different contents of the same UIDs raced by several tasks: one wins
    per UID, every other arrival is set aside, exactly once."""
    index = InstanceIndex(db_pool)
    versions = [
        [
            synthetic_item("1.2.30", "1.2.30.1", f"1.2.30.1.{n}", content=f"{v}-{n}".encode())
            for n in range(30)
        ]
        for v in range(4)
    ]
    results = await asyncio.gather(*(index.index_batch(v, duplicate_policy=KEEP_FIRST) for v in versions))
    outcomes = [r.outcome for batch in results for r in batch]
    assert outcomes.count("created") == 30
    assert outcomes.count("kept-first") == 90
    assert await _count(db_pool, "instance") == 30
    assert await _count(db_pool, "instance_superseded") == 90


# -- study.stable --------------------------------------------------------------------


async def test_studies_to_announce_claims_once(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    studies = [f"1.2.40.{s}" for s in range(5)]
    await index.index_batch(
        [synthetic_item(s, f"{s}.1", f"{s}.1.1", modality="MR") for s in studies], duplicate_policy=KEEP_FIRST
    )
    assert await index.studies_to_announce(quiet_seconds=3600) == []  # not quiet long enough

    async def slow_publish(claimed: list[StableStudy]) -> None:
        await asyncio.sleep(0.3)  # holds the claim (row locks) meanwhile

    first, second = await asyncio.gather(
        index.studies_to_announce(0, on_claimed=slow_publish),
        index.studies_to_announce(0, on_claimed=slow_publish),
    )
    claimed = [s.study_instance_uid for s in first + second]
    assert sorted(claimed) == studies  # each exactly once
    stable = (first + second)[0]
    assert stable.modalities_in_study == ["MR"]
    assert (stable.number_of_series, stable.number_of_instances) == (1, 1)
    assert stable.patient_id == "P1"
    assert stable.last_received_at == T0
    assert await index.studies_to_announce(0) == []

    # A new instance makes its study due again.
    await index.index_batch(
        [synthetic_item(studies[0], f"{studies[0]}.1", "1.2.40.0.1.2")], duplicate_policy=KEEP_FIRST
    )
    [again] = await index.studies_to_announce(0)
    assert (again.study_instance_uid, again.number_of_instances) == (studies[0], 2)


async def test_failed_announcement_is_claimed_again(db_pool: asyncpg.Pool) -> None:
    index = InstanceIndex(db_pool)
    await index.index_batch([synthetic_item("1.2.41", "1.2.41.1", "1.2.41.1.1")], duplicate_policy=KEEP_FIRST)

    async def broker_down(claimed: list[StableStudy]) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        await index.studies_to_announce(0, on_claimed=broker_down)
    [retried] = await index.studies_to_announce(0)
    assert retried.study_instance_uid == "1.2.41"
