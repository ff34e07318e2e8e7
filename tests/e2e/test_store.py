"""C-STORE with DCMTK's storescu: everything pydicom bundles and a generated
CT series arrive, are indexed with the right attributes, and are stored
byte for byte as sent."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import dataset_bytes, pydicom_corpus, write_ct_series
from pacs_e2e.dcmtk import ReferenceReceiver, store_outcomes, storescu, write_storescu_config
from pacs_e2e.index import IndexReader
from pacs_e2e.metrics import total, wait_until_drained


def _stored_dataset_bytes(pacs: LocalSystem, key: str) -> bytes:
    return dataset_bytes(pacs.storage_path / key)


def _has_identity(ds: Dataset) -> bool:
    return all(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def _same_dataset(stored: bytes, reference: bytes, row: dict[str, object]) -> bool:
    """Stored bytes equal the bytes sent.  One exception, in the reference:
    a deflated dataset goes over the wire padded to even length, and
    storescp -B writes the deflate stream without that pad byte."""
    if row["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian and len(stored) % 2 == 0:
        return stored in (reference, reference + b"\x00")
    return stored == reference


def _text(value: object) -> str:
    return "" if value is None else str(value)


def test_pydicom_corpus_is_indexed_and_stored_bit_exact(
    pacs: LocalSystem, index: IndexReader, tmp_path: Path
) -> None:
    corpus = pydicom_corpus()
    assert len(corpus) >= 60, "pydicom's bundled test files are missing"
    config = (tmp_path / "storescu.cfg", write_storescu_config(corpus, tmp_path / "storescu.cfg"))
    paths = [f.path for f in corpus]

    # What storescu sends, captured bit-preserving by DCMTK's own storescp.
    with ReferenceReceiver(tmp_path / "reference", find_free_port()) as reference:
        storescu(reference.port, paths, called="REFERENCE", config=config)
        sent = reference.received()
    assert len(sent) >= 55, f"storescu sent only {len(sent)} files"

    result = storescu(pacs.gateway_port, paths, called=pacs.ae_title, config=config)
    outcomes = {name: v for name, v in store_outcomes(result).items() if v != "not sent"}
    assert len(outcomes) == len(sent), "storescu offered the PACS other files than the reference"
    # The PACS stores everything DCMTK's own receiver accepted, except datasets
    # without the UIDs that place them in the hierarchy: those are refused with
    # 0xA900 and a reason, never silently dropped.
    for name, verdict in outcomes.items():
        if _has_identity(dcmread(name, stop_before_pixels=True)):
            assert verdict == "Success", f"{name}: {verdict}"
        else:
            assert "DataSetDoesNotMatchSOPClass" in verdict, f"{name}: {verdict}"

    sent_by_uid: dict[str, list[Path]] = defaultdict(list)  # in arrival order
    for path in sent:
        ds = dcmread(path, stop_before_pixels=True)
        if _has_identity(ds):
            sent_by_uid[str(ds.SOPInstanceUID)].append(path)
    assert len(sent_by_uid) >= 35

    index.wait_for_instances(sent_by_uid)
    wait_until_drained(pacs)  # late arrivals of a UID may still change which version is indexed
    rows = index.instances(sent_by_uid)
    assert set(rows) == set(sent_by_uid)
    for uid, versions in sent_by_uid.items():
        row = rows[uid]
        # keep-first: the index points to what arrived first under this UID
        first = versions[0]
        assert _same_dataset(_stored_dataset_bytes(pacs, row["key"]), dataset_bytes(first), row), (
            f"{uid}: stored bytes differ"
        )
        expected = dcmread(first, stop_before_pixels=True)
        assert row["study_instance_uid"] == expected.StudyInstanceUID
        assert row["series_instance_uid"] == expected.SeriesInstanceUID
        assert row["sop_class_uid"] == expected.SOPClassUID
        assert _text(row["patient_id"]) == _text(expected.get("PatientID", ""))
        assert _text(row["modality"]) == _text(expected.get("Modality", ""))

    # every other version of a UID is kept too, and the decision recorded
    superseded = index.fetch("SELECT sop_instance_uid, decision FROM instance_superseded")
    recorded: dict[str, int] = defaultdict(int)
    for entry in superseded:
        recorded[entry["sop_instance_uid"]] += 1
    for uid, versions in sent_by_uid.items():
        first_bytes = dataset_bytes(versions[0])
        distinct_later = {b for b in map(dataset_bytes, versions[1:]) if b != first_bytes}
        assert recorded[uid] >= len(distinct_later), f"{uid}: duplicate decisions not recorded"


def test_generated_ct_series(pacs: LocalSystem, index: IndexReader, tmp_path: Path) -> None:
    paths = write_ct_series(
        tmp_path / "ct", 200, patient_id="CT-200", patient_name="Series^Two Hundred", seed=7
    )
    result = storescu(pacs.gateway_port, [tmp_path / "ct"], called=pacs.ae_title, extra=["+sd"])
    assert result.returncode == 0, result.output[-3000:]

    datasets = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    rows = index.wait_for_instances(datasets)
    assert len(rows) == 200
    for uid, path in datasets.items():
        row = rows[uid]
        assert _stored_dataset_bytes(pacs, row["key"]) == dataset_bytes(path)
        assert row["patient_id"] == "CT-200"
        assert row["patient_name"] == "Series^Two Hundred"
        assert row["modality"] == "CT"
        assert row["accession_number"] == "ACC00007"
        assert row["instance_number"] == int(path.stem.removeprefix("CT"))

    study_uid = next(iter(rows.values()))["study_instance_uid"]
    study = index.fetch(
        "SELECT number_of_study_related_series, number_of_study_related_instances, modalities_in_study"
        " FROM study WHERE study_instance_uid = $1",
        study_uid,
    )[0]
    assert study["number_of_study_related_series"] == 1
    assert study["number_of_study_related_instances"] == 200
    assert study["modalities_in_study"] == ["CT"]

    # sending the same series again changes nothing
    wait_until_drained(pacs)
    unchanged_before = total(pacs, "worker", "pacs_ingest_instances_total", outcome="unchanged")
    result = storescu(pacs.gateway_port, [tmp_path / "ct"], called=pacs.ae_title, extra=["+sd"])
    assert result.returncode == 0
    wait_until_drained(pacs)
    assert total(pacs, "worker", "pacs_ingest_instances_total", outcome="unchanged") - unchanged_before == 200
    again = index.fetch(
        "SELECT number_of_study_related_instances FROM study WHERE study_instance_uid = $1", study_uid
    )[0]
    assert again["number_of_study_related_instances"] == 200
    assert index.count_instances(datasets) == 200
