"""De-identification (PS3.15 Annex E) on pydicom's test files, and ``pacs anonymize``."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import UID

from pacs_common.cli.main import main
from pacs_common.dicom.deidentify import (
    Deidentifier,
    DeidentifyOptions,
    UidMapper,
    deidentify,
    patient_key,
)
from pacs_common.dicom.deidentify_profile import PROFILE

SALT = b"test-salt-0123456789abcdef"
DCMDUMP = Path("/usr/bin/dcmdump")
# Attributes whose original values must not survive anywhere.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "AccessionNumber",
    "StationName",
    "OtherPatientIDs",
)
MIN_PHI_LENGTH = 4


def _read(name: str) -> FileDataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return pydicom.dcmread(path)


def _elements(dataset: Dataset) -> Iterator[DataElement]:
    yield from dataset.iterall()
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        yield from meta.iterall()


def _strings(dataset: Dataset) -> list[str]:
    found: list[str] = []
    for element in _elements(dataset):
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        found.extend(str(value).upper() for value in values)
    return found


def _phi(dataset: Dataset) -> set[str]:
    found: set[str] = set()
    for keyword in PHI_KEYWORDS:
        element = dataset.data_element(keyword) if keyword in dataset else None
        if element is None or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            text = str(value)
            found.add(text)
            if element.VR == "PN":
                found.update(part for part in text.split("^") if part)
    # MR_small names its institution after the manufacturer, which is kept.
    manufacturer = str(dataset.get("Manufacturer", "")).upper()
    return {
        value.upper()
        for value in found
        if len(value.strip()) >= MIN_PHI_LENGTH and value.upper() not in manufacturer
    }


ALL_OPTIONS = DeidentifyOptions(
    retain_longitudinal_modified_dates=True, retain_patient_characteristics=True, clean_descriptors=True
)


@pytest.mark.parametrize("options", [DeidentifyOptions(), ALL_OPTIONS], ids=["basic", "all-options"])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG-lossy.dcm", "examples_overlay.dcm"])
def test_no_phi_private_tags_or_overlays_remain(name: str, options: DeidentifyOptions) -> None:
    original = _read(name)
    phi = _phi(original)
    assert phi, "the test file should carry identifying values"

    result = deidentify(original, SALT, options)

    strings = _strings(result)
    leaked = {value for value in phi for text in strings if value in text}
    assert not leaked
    assert not [e.tag for e in result.iterall() if e.tag.is_private]
    assert not [e.tag for e in result.iterall() if 0x5000 <= e.tag.group <= 0x60FF]
    assert result.PatientIdentityRemoved == "YES"
    if options == ALL_OPTIONS:
        codes = ["113100", "113107", "113108", "113105"]
        assert result.LongitudinalTemporalInformationModified == "MODIFIED"
    else:
        codes = ["113100"]
        assert result.LongitudinalTemporalInformationModified == "REMOVED"
    assert [item.CodeValue for item in result.DeidentificationMethodCodeSequence] == codes
    methods = result.DeidentificationMethod
    methods = [methods] if isinstance(methods, str) else list(methods)
    assert len(methods) == len(codes)
    assert methods[0] == "Basic Application Confidentiality Profile"
    assert result.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "examples_overlay.dcm", "CT_small.dcm"])
def test_every_instance_uid_is_remapped_and_classes_are_kept(name: str) -> None:
    original = _read(name)
    originals = {str(e.value) for e in original.iterall() if e.VR == "UI" and e.VM == 1 and e.value}
    result = deidentify(original, SALT)

    for element in result.iterall():
        if element.VR != "UI" or not element.value:
            continue
        for value in element.value if element.VM > 1 else [element.value]:
            assert not UID(str(value)).is_private or str(value).startswith("2.25."), element
            if UID(str(value)).is_private:
                assert str(value) not in originals
    assert result.SOPClassUID == original.SOPClassUID
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_uids_map_consistently_across_instances_of_a_study_and_references_follow() -> None:
    first = _read("CT_small.dcm")
    second = copy.deepcopy(first)
    second.SOPInstanceUID = first.SOPInstanceUID + ".2"
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second.ReferencedImageSequence = [reference]
    second.SourceImageSequence = [copy.deepcopy(reference)]

    # Two independent de-identifiers stand for two calls or two processes.
    new_first = Deidentifier(SALT).deidentify(first)
    new_second = Deidentifier(SALT).deidentify(second)

    assert new_first.StudyInstanceUID == new_second.StudyInstanceUID != first.StudyInstanceUID
    assert new_first.SeriesInstanceUID == new_second.SeriesInstanceUID
    assert new_first.FrameOfReferenceUID == new_second.FrameOfReferenceUID
    assert new_first.SOPInstanceUID != new_second.SOPInstanceUID
    for sequence in (new_second.ReferencedImageSequence, new_second.SourceImageSequence):
        assert sequence[0].ReferencedSOPInstanceUID == new_first.SOPInstanceUID
        assert sequence[0].ReferencedSOPClassUID == first.SOPClassUID
    assert new_first.PatientID == new_second.PatientID

    other_salt = Deidentifier(b"another-salt-0123456789").deidentify(first)
    assert other_salt.StudyInstanceUID != new_first.StudyInstanceUID


def test_a_scope_gives_another_consistent_copy() -> None:
    original = _read("CT_small.dcm")
    default = deidentify(original, SALT)
    copy_a = deidentify(original, SALT, DeidentifyOptions(scope="copy-2"))
    copy_b = deidentify(original, SALT, DeidentifyOptions(scope="copy-2"))

    assert copy_a.StudyInstanceUID == copy_b.StudyInstanceUID != default.StudyInstanceUID
    assert copy_a.PatientID == copy_b.PatientID != default.PatientID


def test_structured_content_items_get_dummies_and_mapped_uids() -> None:
    dataset = _read("CT_small.dcm")
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = f"Patient {dataset.PatientName} seen at {dataset.InstitutionName}"
    person = Dataset()
    person.ValueType = "PNAME"
    person.PersonName = "Doctor^Who"
    uid = Dataset()
    uid.ValueType = "UIDREF"
    uid.UID = "1.2.3.4.5.6"
    dataset.ContentSequence = [item, person, uid]
    dataset.VerifyingObserverSequence = [Dataset()]
    dataset.VerifyingObserverSequence[0].VerifyingObserverName = "Doctor^Who"
    dataset.VerifyingObserverSequence[0].VerificationDateTime = "20040119120000"

    result = deidentify(dataset, SALT)

    content = result.ContentSequence
    assert content[0].TextValue == "ANONYMIZED"
    assert content[0].ValueType == "TEXT"
    assert content[1].PersonName == "ANONYMIZED"
    assert UidMapper(SALT).map("1.2.3.4.5.6") == content[2].UID
    observer = result.VerifyingObserverSequence[0]
    assert observer.VerifyingObserverName == "ANONYMIZED"
    assert observer.VerificationDateTime == "19000101000000"


def test_uid_mapper_gives_valid_uuid_derived_uids_in_any_process() -> None:
    mapped = UidMapper(SALT).map("1.2.840.113619.2.1.1.322987881.621.736170080.681")
    assert len(mapped) <= 64
    assert mapped.startswith("2.25.")
    assert uuid.UUID(int=int(mapped.removeprefix("2.25."))).version == 8

    code = (
        "from pacs_common.dicom.deidentify import UidMapper;"
        f"print(UidMapper({SALT!r}).map('1.2.840.113619.2.1.1.322987881.621.736170080.681'))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == mapped


def test_pixel_data_and_the_input_are_untouched() -> None:
    original = _read("CT_small.dcm")
    before = copy.deepcopy(original)

    result = deidentify(original, SALT)

    assert result.PixelData == before.PixelData
    assert (result.pixel_array == before.pixel_array).all()
    assert original == before
    assert original.PatientName == before.PatientName


def test_dates_are_removed_without_the_longitudinal_option() -> None:
    original = _read("CT_small.dcm")
    result = deidentify(original, SALT)

    assert result.StudyDate == ""
    dates = {str(e.value) for e in original.iterall() if e.VR in ("DA", "DT") and e.value}
    assert dates
    assert not dates & set(_strings(result))


def test_longitudinal_option_shifts_every_date_by_one_offset_per_patient() -> None:
    first = _read("CT_small.dcm")
    second = copy.deepcopy(first)
    second.SOPInstanceUID = first.SOPInstanceUID + ".2"
    options = DeidentifyOptions(retain_longitudinal_modified_dates=True)
    deidentifier = Deidentifier(SALT, options)
    offset = deidentifier.date_offset(patient_key(first))
    assert offset < 0

    for original in (first, second):
        result = Deidentifier(SALT, options).deidentify(original)
        for element in original:
            if element.VR == "DA" and element.value and element.keyword != "PatientBirthDate":
                expected = date.fromisoformat(str(element.value)) + timedelta(days=offset)
                assert result[element.tag].value == expected.strftime("%Y%m%d"), element.keyword
        assert result.StudyTime == original.StudyTime
        assert result.PatientBirthDate == ""
        assert result.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [i.CodeValue for i in result.DeidentificationMethodCodeSequence] == ["113100", "113107"]


def test_date_time_values_keep_their_time_and_fixed_offsets_are_honoured() -> None:
    dataset = _read("CT_small.dcm")
    dataset.AcquisitionDateTime = "20040119072731.5+0100"
    options = DeidentifyOptions(retain_longitudinal_modified_dates=True, date_offset_days=-10)

    result = deidentify(dataset, SALT, options)

    assert result.StudyDate == "20040109"
    assert result.AcquisitionDateTime == "20040109072731.5+0100"


def test_patient_characteristics_option() -> None:
    original = _read("CT_small.dcm")
    original.PatientAge = "045Y"
    original.PatientWeight = "80"

    plain = deidentify(original, SALT)
    kept = deidentify(original, SALT, DeidentifyOptions(retain_patient_characteristics=True))

    assert plain.PatientSex == ""
    assert "PatientAge" not in plain
    assert "PatientWeight" not in plain
    assert kept.PatientSex == original.PatientSex
    assert kept.PatientAge == "045Y"
    assert kept.PatientWeight == 80
    assert "113108" in [i.CodeValue for i in kept.DeidentificationMethodCodeSequence]


def test_clean_descriptors_option_cuts_identifying_values_out() -> None:
    original = _read("CT_small.dcm")
    family = str(original.PatientName).split("^")[0]
    original.StudyDescription = f"CT chest for {family} at {original.InstitutionName}"
    original.SeriesDescription = f"axial {original.PatientID}"

    plain = deidentify(original, SALT)
    cleaned = deidentify(original, SALT, DeidentifyOptions(clean_descriptors=True))

    assert "StudyDescription" not in plain
    assert "SeriesDescription" not in plain
    assert cleaned.StudyDescription == "CT chest for at"
    assert cleaned.SeriesDescription == "axial"
    assert "113105" in [i.CodeValue for i in cleaned.DeidentificationMethodCodeSequence]


def test_patient_identity_is_given_or_a_stable_pseudonym() -> None:
    ct = _read("CT_small.dcm")
    mr = _read("MR_small.dcm")

    given = deidentify(ct, SALT, DeidentifyOptions(patient_id="SUBJ-001", patient_name="SUBJECT^ONE"))
    assert given.PatientID == "SUBJ-001"
    assert given.PatientName == "SUBJECT^ONE"

    assert deidentify(ct, SALT).PatientID == deidentify(ct, SALT).PatientID
    assert deidentify(ct, SALT).PatientID != deidentify(mr, SALT).PatientID
    assert deidentify(ct, SALT).PatientID != deidentify(ct, b"another-salt-0123456789").PatientID


def test_options_and_salt_are_validated() -> None:
    with pytest.raises(ValidationError):
        DeidentifyOptions(patient_id="A\\B")
    with pytest.raises(ValidationError):
        DeidentifyOptions.model_validate({"retain_safe_private": True})
    with pytest.raises(ValueError, match="salt"):
        Deidentifier(b"short")


def test_profile_table_spot_checks() -> None:
    assert PROFILE[0x00100010].basic == "Z"
    assert PROFILE[0x0020000D].basic == "U"
    assert PROFILE[0x00080020].retain_modified_dates == "C"
    assert PROFILE[0x00101010].retain_patient_characteristics == "K"
    assert PROFILE[0x00081030].clean_descriptors == "C"
    assert PROFILE[0x00081140].basic == "X/Z/U*"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG-lossy.dcm", "examples_overlay.dcm"])
def test_output_is_valid_part10_for_pydicom_and_dcmtk(name: str, tmp_path: Path) -> None:
    options = DeidentifyOptions(retain_longitudinal_modified_dates=True, clean_descriptors=True)
    result = deidentify(_read(name), SALT, options)
    path = tmp_path / "out.dcm"
    result.save_as(path, enforce_file_format=True)

    again = pydicom.dcmread(path)
    assert again.SOPInstanceUID == result.SOPInstanceUID
    assert again.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID

    if not DCMDUMP.exists():
        pytest.skip("DCMTK dcmdump is not installed")
    dump = subprocess.run([str(DCMDUMP), "-dc", str(path)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stderr
    assert "E: " not in dump.stderr + dump.stdout
    assert "PatientIdentityRemoved" in dump.stdout


def _cli_inputs(tmp_path: Path) -> Path:
    source = tmp_path / "in"
    (source / "nested").mkdir(parents=True)
    for name, target in (("CT_small.dcm", "ct"), ("MR_small.dcm", "nested/mr")):
        path = get_testdata_file(name, download=False)
        assert path is not None
        shutil.copy(path, source / target)
    (source / "nested" / "README.txt").write_text("not DICOM\n")
    return source


def test_cli_anonymizes_a_directory_and_reports_non_dicom(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _cli_inputs(tmp_path)
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(SALT + b"\n")
    output = tmp_path / "out"

    code = main(
        ["anonymize", str(source), "--output", str(output), "--salt-file", str(salt_file), "--retain-dates"]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "README.txt" in captured.err
    assert "not a DICOM file" in captured.err
    written = sorted(output.rglob("*.dcm"))
    assert len(written) == 2
    expected = {
        Deidentifier(SALT).uids.map(str(_read(name).SOPInstanceUID))
        for name in ("CT_small.dcm", "MR_small.dcm")
    }
    assert {path.stem for path in written} == expected
    for path in written:
        dataset = pydicom.dcmread(path)
        assert dataset.PatientIdentityRemoved == "YES"
        assert "113107" in [i.CodeValue for i in dataset.DeidentificationMethodCodeSequence]
        assert path.parent.name == dataset.SeriesInstanceUID
        assert path.parent.parent.name == dataset.StudyInstanceUID


def test_cli_salt_from_environment_and_patient_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _cli_inputs(tmp_path)
    monkeypatch.setenv("PACS_DEIDENTIFY_SALT", SALT.decode())
    output = tmp_path / "out"

    code = main(
        ["anonymize", str(source / "ct"), "-o", str(output), "--patient-id", "P1", "--patient-name", "X^Y"]
    )

    assert code == 0, capsys.readouterr().err
    (path,) = output.rglob("*.dcm")
    dataset = pydicom.dcmread(path)
    assert dataset.PatientID == "P1"
    assert dataset.PatientName == "X^Y"


def test_cli_fails_without_salt_and_on_missing_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _cli_inputs(tmp_path)
    monkeypatch.delenv("PACS_DEIDENTIFY_SALT", raising=False)

    assert main(["anonymize", str(source), "-o", str(tmp_path / "out")]) == 1
    assert "PACS_DEIDENTIFY_SALT" in capsys.readouterr().err

    monkeypatch.setenv("PACS_DEIDENTIFY_SALT", SALT.decode())
    code = main(["anonymize", str(source / "ct"), str(tmp_path / "missing.dcm"), "-o", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 1
    assert "missing.dcm" in captured.err
    assert "anonymized 1 file(s)" in captured.out
