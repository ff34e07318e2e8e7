"""Query/Retrieve end to end with real peers: DCMTK findscu, movescu and
getscu, DCMTK storescp and Orthanc as C-MOVE destinations, and a pynetdicom
SCU for queries in other character sets.

The archive gets its studies the way a modality sends them (storescu); the
answers are compared with what was sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import CorpusFile, SeriesSpec, StudyFiles, dataset_bytes, write_study
from pacs_e2e.dcmtk import (
    DCMTK_ENV,
    ReferenceReceiver,
    echoscu,
    final_status,
    findscu,
    getscu,
    movescu,
    store_outcomes,
    storescu,
    tool,
    write_storescu_config,
)
from pacs_e2e.index import IndexReader
from pacs_e2e.orthanc import OrthancServer, orthanc_binary
from pacs_e2e.system import pacs_cli


@dataclass
class Archive:
    doe_ct: StudyFiles
    doe_mr: StudyFiles
    smith_cr: StudyFiles
    jpeg: StudyFiles
    charset_files: list[Path]

    @property
    def studies(self) -> list[StudyFiles]:
        return [self.doe_ct, self.doe_mr, self.smith_cr, self.jpeg]


def _jpeg_study(directory: Path, patient_id: str) -> StudyFiles:
    """pydicom's JPEG 2000 lossless MR image, moved into a study of our own."""
    source = get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    assert source is not None
    ds = dcmread(source)
    study = StudyFiles(patient_id, "Smith^Anna", generate_uid(), "20231202", "QR-JPEG")
    ds.PatientID, ds.PatientName = patient_id, "Smith^Anna"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_instance_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate, ds.AccessionNumber, ds.Modality = "20231202", "QR-JPEG", "CT"
    path = directory / "jpeg" / "IM00001.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    study.series[ds.SeriesInstanceUID] = [path]
    return study


def _charset_files(directory: Path) -> list[Path]:
    """pydicom's character-set files that name a patient, each made a study of its own."""
    paths = []
    for name in (
        "chrFren",
        "chrGerm",
        "chrGreek",
        "chrRuss",
        "chrH31",
        "chrH32",
        "chrI2",
        "chrX1",
        "chrArab",
    ):
        ds = dcmread(get_charset_files(f"{name}.dcm")[0])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"CHARSET-{name}"
        path = directory / "charset" / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def archive(pacs: LocalSystem, index: IndexReader, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    root = tmp_path_factory.mktemp("qr-corpus")
    archive = Archive(
        doe_ct=write_study(
            root,
            patient_id="QR-DOE",
            patient_name="Doe^John",
            study_date="20240110",
            accession_number="QR-A1",
            series=[SeriesSpec("CT", 3, "CHEST")],
        ),
        doe_mr=write_study(
            root,
            patient_id="QR-DOE",
            patient_name="Doe^John",
            study_date="20240315",
            accession_number="QR-A2",
            series=[SeriesSpec("MR", 2, "HEAD"), SeriesSpec("MR", 1, "HEAD")],
        ),
        smith_cr=write_study(
            root,
            patient_id="QR-SMITH",
            patient_name="Smith^Anna",
            study_date="20231201",
            accession_number="QR-B1",
            series=[SeriesSpec("CR", 2)],
        ),
        jpeg=_jpeg_study(root, "QR-SMITH"),
        charset_files=_charset_files(root),
    )
    paths = [p for study in archive.studies for p in study.paths] + archive.charset_files
    files = [
        CorpusFile(
            p, str(m.MediaStorageSOPClassUID), str(m.MediaStorageSOPInstanceUID), str(m.TransferSyntaxUID)
        )
        for p in paths
        for m in [read_file_meta_info(p)]
    ]
    profile = write_storescu_config(files, root / "storescu.cfg")
    result = storescu(pacs.gateway_port, paths, config=(root / "storescu.cfg", profile))
    outcomes = store_outcomes(result)
    assert set(outcomes.values()) == {"Success"}, outcomes
    sop_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    index.wait_for_instances(sop_uids)
    return archive


def _values(responses: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(r.get(keyword, "")) for r in responses)


# -- C-FIND with findscu ------------------------------------------------------


def test_study_root_study_level_wildcard(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    result, responses = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            "PatientName=Doe*",
            "StudyInstanceUID",
            "StudyDate",
            "AccessionNumber",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances",
            "NumberOfStudyRelatedSeries",
            "StudyDescription",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.output
    assert _values(responses, "StudyInstanceUID") == sorted(
        [archive.doe_ct.study_instance_uid, archive.doe_mr.study_instance_uid]
    )
    by_uid = {str(r.StudyInstanceUID): r for r in responses}
    mr = by_uid[archive.doe_mr.study_instance_uid]
    assert mr.AccessionNumber == "QR-A2"
    assert mr.StudyDate == "20240315"
    assert int(mr.NumberOfStudyRelatedInstances) == 3
    assert int(mr.NumberOfStudyRelatedSeries) == 2
    assert list(mr.ModalitiesInStudy) == ["MR"] or mr.ModalitiesInStudy == "MR"
    # An empty return key is returned, filled from the stored data.
    assert mr.StudyDescription == "E2E study"
    assert mr.QueryRetrieveLevel == "STUDY"


def test_pn_matching_is_case_insensitive(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    _, responses = findscu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "PatientName=*MITH*", "StudyInstanceUID"],
        tmp_path,
    )
    assert _values(responses, "StudyInstanceUID") == sorted(
        [archive.smith_cr.study_instance_uid, archive.jpeg.study_instance_uid]
    )


def test_date_ranges(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    def studies(date_range: str) -> list[str]:
        _, responses = findscu(
            pacs.gateway_port,
            "-S",
            ["QueryRetrieveLevel=STUDY", f"StudyDate={date_range}", "PatientID=QR-*", "StudyInstanceUID"],
            tmp_path,
        )
        return _values(responses, "StudyInstanceUID")

    assert studies("20240101-20240229") == [archive.doe_ct.study_instance_uid]
    assert studies("-20231231") == sorted(
        [archive.smith_cr.study_instance_uid, archive.jpeg.study_instance_uid]
    )
    assert studies("20240301-") == [archive.doe_mr.study_instance_uid]
    assert studies("20231201") == [archive.smith_cr.study_instance_uid]


def test_uid_list_and_modalities(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    uids = [archive.doe_ct.study_instance_uid, archive.smith_cr.study_instance_uid]
    _, responses = findscu(
        pacs.gateway_port, "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(uids)], tmp_path
    )
    assert _values(responses, "StudyInstanceUID") == sorted(uids)
    _, responses = findscu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "ModalitiesInStudy=CR", "PatientID=QR-*", "StudyInstanceUID"],
        tmp_path,
    )
    assert _values(responses, "StudyInstanceUID") == [archive.smith_cr.study_instance_uid]


def test_series_and_image_levels(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    study = archive.doe_mr
    _, series = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study.study_instance_uid}",
            "SeriesInstanceUID",
            "Modality",
            "NumberOfSeriesRelatedInstances",
            "BodyPartExamined",
        ],
        tmp_path,
    )
    assert _values(series, "SeriesInstanceUID") == sorted(study.series)
    for response in series:
        paths = study.series[str(response.SeriesInstanceUID)]
        assert int(response.NumberOfSeriesRelatedInstances) == len(paths)
        assert response.Modality == "MR"
        assert response.BodyPartExamined == "HEAD"
    series_uid, paths = next(iter(study.series.items()))
    _, images = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study.study_instance_uid}",
            f"SeriesInstanceUID={series_uid}",
            "SOPInstanceUID",
            "SOPClassUID",
            "InstanceNumber",
        ],
        tmp_path,
    )
    expected = sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)
    assert _values(images, "SOPInstanceUID") == expected


def test_patient_root(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    _, patients = findscu(
        pacs.gateway_port,
        "-P",
        [
            "QueryRetrieveLevel=PATIENT",
            "PatientName=D?e^*",
            "PatientID",
            "PatientBirthDate",
            "NumberOfPatientRelatedStudies",
        ],
        tmp_path,
    )
    assert _values(patients, "PatientID") == ["QR-DOE"]
    assert int(patients[0].NumberOfPatientRelatedStudies) == 2
    assert patients[0].PatientBirthDate == "19700101"
    _, studies = findscu(
        pacs.gateway_port,
        "-P",
        ["QueryRetrieveLevel=STUDY", "PatientID=QR-SMITH", "StudyInstanceUID", "AccessionNumber"],
        tmp_path,
    )
    assert _values(studies, "AccessionNumber") == ["QR-B1", "QR-JPEG"]


def test_bad_identifiers_fail_cleanly(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    # No such level: a failure status, not a dropped association.
    result, responses = findscu(
        pacs.gateway_port, "-S", ["QueryRetrieveLevel=WARD", "PatientName=Doe*"], tmp_path
    )
    assert responses == []
    assert "Association Aborted" not in result.output
    assert "Failed" in result.output or "Error" in result.output or "0xa900" in result.output.lower()
    # A malformed date range.
    result, responses = findscu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "StudyDate=2024-01-01", "StudyInstanceUID"],
        tmp_path,
    )
    assert responses == []
    assert "Association Aborted" not in result.output
    # The gateway still answers.
    assert echoscu(pacs.gateway_port).returncode == 0


# -- C-MOVE / C-GET -----------------------------------------------------------


def _sop_uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _received_by_uid(paths: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def _register(pacs: LocalSystem, ae_title: str, port: int) -> None:
    result = pacs_cli(pacs, "node", "add", ae_title, "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 0, result.stdout + result.stderr


def test_movescu_to_itself(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    port = find_free_port()
    _register(pacs, "MOVESCU", port)
    study = archive.doe_mr
    result = movescu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}"],
        "MOVESCU",
        out_dir=tmp_path / "in",
        receive_port=port,
        calling="MOVESCU",
    )
    assert result.returncode == 0, result.output
    assert final_status(result, "Move") == "Success", result.output
    received = _received_by_uid(sorted((tmp_path / "in").iterdir()))
    assert set(received) == _sop_uids(study.paths)
    for path in study.paths:
        original = dcmread(path)
        got = dcmread(received[str(original.SOPInstanceUID)])
        assert got.PixelData == original.PixelData
        assert got.PatientName == original.PatientName


def test_movescu_to_storescp_byte_identical(
    pacs: LocalSystem, archive: Archive, index: IndexReader, tmp_path: Path
) -> None:
    port = find_free_port()
    _register(pacs, "REFERENCE", port)
    study = archive.smith_cr
    with ReferenceReceiver(tmp_path / "ref", port) as receiver:
        result = movescu(
            pacs.gateway_port,
            "-P",
            [
                "QueryRetrieveLevel=STUDY",
                "PatientID=QR-SMITH",
                f"StudyInstanceUID={study.study_instance_uid}",
            ],
            "REFERENCE",
        )
        received = receiver.received()
    assert final_status(result, "Move") == "Success", result.output
    assert len(received) == len(study.paths)
    by_uid = _received_by_uid(received)
    for path in study.paths:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(path)
    # The move is on record as a job, for operators (REST /api/v1/jobs).
    (job,) = index.fetch(
        "SELECT state, progress_done, progress_total, params->>'requested_by' AS requested_by FROM job "
        "WHERE kind = 'move' AND params->>'destination' = 'REFERENCE'"
    )
    assert job == {
        "state": "done",
        "progress_done": len(study.paths),
        "progress_total": len(study.paths),
        "requested_by": "E2E",
    }


def test_move_transcodes_for_a_destination_without_jpeg(
    pacs: LocalSystem, archive: Archive, tmp_path: Path
) -> None:
    """storescp accepts only uncompressed syntaxes by default: the JPEG
    Lossless instance must arrive decompressed, pixel for pixel."""
    port = find_free_port()
    _register(pacs, "PLAIN", port)
    out = tmp_path / "plain"
    out.mkdir()
    proc = subprocess.Popen(
        [tool("storescp"), "-od", str(out), "-aet", "PLAIN", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while echoscu(port, called="PLAIN").returncode != 0:
            assert proc.poll() is None
        result = movescu(
            pacs.gateway_port,
            "-S",
            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={archive.jpeg.study_instance_uid}"],
            "PLAIN",
        )
    finally:
        proc.terminate()
        proc.wait(10)
    assert final_status(result, "Move") == "Success", result.output
    (received,) = list(out.iterdir())
    got = dcmread(received)
    assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    original = dcmread(archive.jpeg.paths[0])
    assert (got.pixel_array == original.pixel_array).all()


def test_move_to_unknown_destination(pacs: LocalSystem, archive: Archive) -> None:
    result = movescu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={archive.doe_ct.study_instance_uid}"],
        "NOWHERE",
    )
    assert final_status(result, "Move") == "Refused: MoveDestinationUnknown", result.output


def test_getscu(pacs: LocalSystem, archive: Archive, tmp_path: Path) -> None:
    study = archive.doe_ct
    result = getscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study.study_instance_uid}",
            f"SeriesInstanceUID={next(iter(study.series))}",
        ],
        tmp_path / "got",
    )
    assert result.returncode == 0, result.output
    assert final_status(result, "GET") in ("Success", ""), result.output
    received = _received_by_uid(sorted((tmp_path / "got").iterdir()))
    assert set(received) == _sop_uids(study.paths)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt package orthanc; deploy/local/bootstrap.sh --test)")
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


def test_move_study_into_orthanc(pacs: LocalSystem, archive: Archive, orthanc: OrthancServer) -> None:
    _register(pacs, orthanc.aet, orthanc.dicom_port)
    study = archive.doe_mr
    result = movescu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}"],
        orthanc.aet,
    )
    assert final_status(result, "Move") == "Success", result.output
    assert orthanc.sop_instance_uids() == _sop_uids(study.paths)


# -- character sets (pynetdicom SCU: identifiers in the file's own charset) ----


def _find_by_name(pacs: LocalSystem, charset: str | list[str], name: str) -> list[Dataset]:
    ae = AE(ae_title="CHARSET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", pacs.gateway_port, ae_title="PACS")
    assert assoc.is_established
    try:
        query = Dataset()
        query.SpecificCharacterSet = charset
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = name
        query.PatientID = ""
        query.StudyInstanceUID = ""
        matches = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            assert status is not None
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                matches.append(identifier)
            else:
                assert status.Status == 0x0000, hex(status.Status)
        return matches
    finally:
        assoc.release()


def test_charset_files_are_found_by_name_in_their_own_character_set(
    pacs: LocalSystem, archive: Archive
) -> None:
    for path in archive.charset_files:
        ds = dcmread(path, stop_before_pixels=True)
        charset = ds.SpecificCharacterSet
        matches = _find_by_name(pacs, charset, str(ds.PatientName))
        assert [str(m.StudyInstanceUID) for m in matches] == [str(ds.StudyInstanceUID)], path.name
        # The name comes back as it was stored, whatever encoding the answer used.
        assert str(matches[0].PatientName) == str(ds.PatientName), path.name


def test_ideographic_prefix_matches_japanese_names(pacs: LocalSystem, archive: Archive) -> None:
    matches = _find_by_name(pacs, ["", "ISO 2022 IR 87"], "山田*")
    assert {str(m.PatientID) for m in matches} == {"CHARSET-chrH31", "CHARSET-chrH32"}
    korean = _find_by_name(pacs, ["", "ISO 2022 IR 149"], "홍^길동")
    assert [str(m.PatientID) for m in korean] == ["CHARSET-chrI2"]
