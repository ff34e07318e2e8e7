"""parse_for_index over real files: every file pydicom ships, bulk data,
character sets, odd and broken data, forward-only streams."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT as PYDICOM_DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from pacs_common.dicom.metadata import (
    BULK_DATA_URI_PREFIX,
    InvalidInstanceError,
    NotDicomError,
    ParsedInstance,
    parse_for_index,
)

DATA_ROOT = Path(PYDICOM_DATA_ROOT)
THRESHOLD = 1024

# Every file bundled with pydicom (what get_testdata_files("*") and
# get_charset_files("*") return, plus palettes and the DICOMDIR trees),
# listed from disk so the test never waits on pydicom's download attempts.
ALL_FILES = sorted(
    p
    for p in DATA_ROOT.rglob("*")
    if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
)

# Bundled files that are DICOM but not indexable instances (no SOP Instance
# UID anywhere), or that pydicom itself cannot read as a dataset.
NOT_INDEXABLE = {
    "test_files/empty_charset_LEI.dcm",  # two elements, no UIDs
    "test_files/meta_missing_tsyntax.dcm",
    "test_files/nested_priv_SQ.dcm",  # a private sequence only
    "test_files/no_meta.dcm",  # pydicom reads one element of it
}


def _testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def _charset(name: str) -> Path:
    return DATA_ROOT / "charset_files" / name


def _is_other_format(path: Path) -> bool:
    """README, JSON, ICC profile, gzip, text dumps: not DICOM at all."""
    return path.suffix in {".txt", ".json", ".md", ".icc", ".gz", ".dump"} or path.name == "README"


class RecordingReader(io.RawIOBase):
    """A seekable file that records every byte range read through it."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = data
        self._pos = 0
        self.reads: list[tuple[int, int]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else self._pos + size
        chunk = self._data[self._pos : end]
        if chunk:
            self.reads.append((self._pos, len(chunk)))
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def bytes_read_within(self, start: int, end: int) -> int:
        return sum(max(0, min(s + n, end) - max(s, start)) for s, n in self.reads)


class ForwardOnly(io.RawIOBase):
    """An HTTP-body-like stream: read only, no seek, no tell."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> bytes:
        return self._inner.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _parse(path: Path, threshold: int = THRESHOLD) -> ParsedInstance:
    with path.open("rb") as f:
        return parse_for_index(f, bulk_data_threshold=threshold)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "vr" in node:
            yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# -- every bundled file -------------------------------------------------------


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(DATA_ROOT)))
def test_every_bundled_file(path: Path) -> None:
    relative = str(path.relative_to(DATA_ROOT))
    data = path.read_bytes()
    reader = RecordingReader(data)
    try:
        parsed = parse_for_index(cast(BinaryIO, reader), bulk_data_threshold=THRESHOLD)
    except NotDicomError:
        assert relative in NOT_INDEXABLE or _is_other_format(path), relative
        return
    assert relative not in NOT_INDEXABLE and not _is_other_format(path), relative

    instance = parsed.instance
    assert instance.sop_instance_uid and instance.sop_class_uid
    assert parsed.transfer_syntax_uid.startswith("1.2.840.10008.1.2")
    # What PostgreSQL will store: valid JSON, no NaN, no NUL.
    text = json.dumps(parsed.metadata, ensure_ascii=False, allow_nan=False)
    assert "\\u0000" not in text
    json.dumps(parsed.bulk_data_json(), allow_nan=False)

    for element in _walk(parsed.metadata):
        assert isinstance(element["vr"], str) and len(element["vr"]) == 2, element
        if "InlineBinary" in element:
            assert len(base64.b64decode(element["InlineBinary"])) <= THRESHOLD
        if "BulkDataURI" in element:
            path_part = element["BulkDataURI"].removeprefix(BULK_DATA_URI_PREFIX)
            assert path_part in parsed.bulk_data

    # Pixel Data is never read: at most its element header and item headers.
    pixel = parsed.bulk_data.get("7FE00010")
    if pixel is not None and pixel.offset is not None:
        if pixel.length is not None:
            assert reader.bytes_read_within(pixel.offset, pixel.offset + pixel.length) == 0
        else:
            fragments = pixel.fragments or []
            assert fragments, "encapsulated pixel data items are listed"
            end = fragments[-1][0] + fragments[-1][1]
            assert reader.bytes_read_within(pixel.offset, end) == 8 * len(fragments)  # item headers

    # Every bundled file converts without a single element lost or mangled.
    assert parsed.warnings == []

    # The index values agree with pydicom reading the same file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    expected_keys = {
        f"{int(tag):08X}"
        for tag in reference.keys()  # noqa: SIM118 - iterating a Dataset yields elements, not tags
        if tag.element != 0 and tag.group not in (0x0000, 0x0002) and tag != 0xFFFCFFFC
    }
    assert expected_keys <= set(parsed.metadata)
    if "SOPInstanceUID" in reference:
        assert instance.sop_instance_uid == str(reference.SOPInstanceUID).strip()
    if reference.get("PatientName"):
        assert parsed.patient.patient_name == str(reference.PatientName).strip()
        assert parsed.patient.patient_name_norm == str(reference.PatientName).strip().upper()
    if reference.get("Modality"):
        assert parsed.series.modality == str(reference.Modality)


# -- values ---------------------------------------------------------------------


def test_ct_small_index_attributes() -> None:
    parsed = _parse(_testdata("CT_small.dcm"))
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    assert parsed.transfer_syntax_uid == ExplicitVRLittleEndian
    assert parsed.patient.patient_id == ds.PatientID == "1CT1"
    assert parsed.patient.patient_name == "CompressedSamples^CT1"
    assert parsed.patient.patient_name_norm == "COMPRESSEDSAMPLES^CT1"
    assert parsed.study.study_instance_uid == ds.StudyInstanceUID
    assert parsed.study.study_date == ds.StudyDate
    assert parsed.series.series_instance_uid == ds.SeriesInstanceUID
    assert parsed.series.modality == "CT"
    assert parsed.instance.rows == ds.Rows == 128
    assert parsed.instance.columns == 128
    assert parsed.instance.bits_allocated == 16
    assert parsed.instance.image_type == "\\".join(ds.ImageType)
    assert parsed.instance.instance_number == int(ds.InstanceNumber)


def _comparable(element: dict[str, Any]) -> Any:
    """A JSON element as values to compare (ours writes empty values as null,
    PS3.18 F.2.5; numbers compare as floats)."""
    values = element.get("Value")
    if values is None or element["vr"] == "SQ":
        return None
    out: list[Any] = []
    for v in values:
        if v == "" or v is None:
            out.append(None)
        elif element["vr"] in ("DS", "FL", "FD", "IS", "SL", "SS", "UL", "US", "SV", "UV"):
            try:
                out.append(round(float(v), 6))
            except (TypeError, ValueError):
                out.append(str(v))
        elif isinstance(v, str):
            out.append(v.strip() or None)  # padding inside multi-values is not significant
        else:
            out.append(v)
    return out


def _compare_dataset(ours: dict[str, Any], reference: dict[str, Any], where: str) -> None:
    for key, expected in reference.items():
        if (
            key == "FFFCFFFC"
            or key.endswith("0000")
            or "BulkDataURI" in expected
            or "InlineBinary" in expected
        ):
            continue  # padding, group lengths (not in DICOM JSON), binary
        got = ours.get(key)
        assert got is not None, f"{where}{key} missing"
        assert got["vr"] == expected["vr"], f"{where}{key}"
        if expected["vr"] == "SQ":
            for n, (a, b) in enumerate(zip(got.get("Value", []), expected.get("Value", []), strict=True)):
                _compare_dataset(a, b, f"{where}{key}/{n}/")
            continue
        assert _comparable(got) == _comparable(expected), f"{where}{key}"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(DATA_ROOT)))
def test_json_matches_pydicom(path: Path) -> None:
    """Our conversion (a fast path for plain elements) gives what pydicom's
    own DICOM JSON gives, element for element, in every bundled file."""
    try:
        parsed = _parse(path)
    except NotDicomError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            reference = ds.to_json_dict(
                bulk_data_threshold=THRESHOLD, bulk_data_element_handler=lambda e: "x"
            )
        except Exception as exc:
            pytest.skip(f"pydicom itself cannot make DICOM JSON of it: {exc}")
    _compare_dataset(parsed.metadata, reference, "")


def test_pixel_data_offsets_point_at_the_value() -> None:
    path = _testdata("CT_small.dcm")
    data = path.read_bytes()
    parsed = _parse(path)
    element = parsed.metadata["7FE00010"]
    assert element == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}
    ref = parsed.bulk_data["7FE00010"]
    assert ref.offset is not None and ref.length is not None
    assert data[ref.offset : ref.offset + ref.length] == pydicom.dcmread(path).PixelData


def test_encapsulated_pixel_data_fragments() -> None:
    path = _testdata("JPEG2000.dcm")
    data = path.read_bytes()
    parsed = _parse(path)
    ref = parsed.bulk_data["7FE00010"]
    assert ref.length is None and ref.fragments
    last_offset, last_length = ref.fragments[-1]
    assert ref.offset is not None
    assert data[ref.offset : last_offset + last_length] == pydicom.dcmread(path).PixelData
    first_frame_offset, _ = ref.fragments[1]  # fragments[0] is the Basic Offset Table
    assert data[first_frame_offset : first_frame_offset + 2] == b"\xff\x4f"  # J2K SOC marker


def test_bulk_data_inside_sequences() -> None:
    path = _testdata("examples_overlay.dcm")
    data = path.read_bytes()
    parsed = _parse(path)
    icon = parsed.metadata["00880200"]["Value"][0]["7FE00010"]
    assert icon["BulkDataURI"] == "bulkdata/00880200/0/7FE00010"
    ref = parsed.bulk_data["00880200/0/7FE00010"]
    ds = pydicom.dcmread(path)
    assert ref.offset is not None and ref.length is not None
    assert data[ref.offset : ref.offset + ref.length] == ds.IconImageSequence[0].PixelData
    assert parsed.metadata["60003000"]["BulkDataURI"] == "bulkdata/60003000"  # overlay data


def test_threshold_decides_inline_or_bulk() -> None:
    path = _testdata("CT_small.dcm")
    small = _parse(path, threshold=1024)
    large = _parse(path, threshold=100_000)
    assert "BulkDataURI" in small.metadata["00431029"]  # a 2 kB private OB
    assert "InlineBinary" in large.metadata["00431029"]
    # Pixel Data is bulk whatever the threshold.
    assert "BulkDataURI" in large.metadata["7FE00010"]


def test_big_endian_inline_binary_is_little_endian() -> None:
    little = _parse(_testdata("MR_small.dcm"), threshold=100_000)
    big = _parse(_testdata("MR_small_bigendian.dcm"), threshold=100_000)
    assert big.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    assert big.patient.patient_name == little.patient.patient_name
    assert {k: v for k, v in big.metadata.items() if v["vr"] != "OW"} == {
        k: v for k, v in little.metadata.items() if v["vr"] != "OW"
    }


def test_deflated_dataset_has_no_offsets() -> None:
    parsed = _parse(_testdata("image_dfl.dcm"))
    assert parsed.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    assert parsed.bulk_data["7FE00010"].offset is None


def test_forward_only_stream_gives_the_same_result() -> None:
    for name in ("CT_small.dcm", "JPEG2000.dcm", "examples_overlay.dcm", "MR_small_bigendian.dcm"):
        data = _testdata(name).read_bytes()
        seekable = parse_for_index(io.BytesIO(data), bulk_data_threshold=THRESHOLD)
        forward = parse_for_index(cast(BinaryIO, ForwardOnly(data)), bulk_data_threshold=THRESHOLD)
        assert forward.metadata == seekable.metadata, name
        assert forward.bulk_data == seekable.bulk_data, name


def test_structured_report_attributes() -> None:
    parsed = _parse(_testdata("test-SR.dcm"))
    ds = pydicom.dcmread(_testdata("test-SR.dcm"))
    assert parsed.instance.completion_flag == ds.CompletionFlag == "COMPLETE"
    assert parsed.instance.verification_flag == ds.VerificationFlag
    code = ds.ConceptNameCodeSequence[0]
    assert parsed.instance.concept_name_code == {
        "CodeValue": code.CodeValue,
        "CodingSchemeDesignator": code.CodingSchemeDesignator,
        "CodeMeaning": code.CodeMeaning,
    }
    assert parsed.series.modality == "SR"


# -- character sets ---------------------------------------------------------------

CHARSET_NAMES = {
    "chrArab.dcm": "قباني^لنزار",
    "chrFren.dcm": "Buc^Jérôme",
    "chrFrenMulti.dcm": "Buc^Jérôme",
    "chrGerm.dcm": "Äneas^Rüdiger",
    "chrGreek.dcm": "Διονυσιος",
    "chrH31.dcm": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "chrH32.dcm": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    "chrHbrw.dcm": "שרון^דבורה",
    "chrI2.dcm": "Hong^Gildong=洪^吉洞=홍^길동",
    "chrJapMulti.dcm": "やまだ^たろう",
    "chrJapMultiExplicitIR6.dcm": "やまだ^たろう",
    "chrKoreanMulti.dcm": "김희중",
    "chrRuss.dcm": "Люкceмбypг",
    "chrX1.dcm": "Wang^XiaoDong=王^小東",
    "chrX2.dcm": "Wang^XiaoDong=王^小东",
}


@pytest.mark.parametrize(("name", "expected"), sorted(CHARSET_NAMES.items()))
def test_character_sets_decode_person_names(name: str, expected: str) -> None:
    parsed = _parse(_charset(name))
    assert parsed.patient.patient_name == expected
    assert parsed.patient.patient_name_norm == expected.upper()
    groups = expected.split("=")
    value = parsed.metadata["00100010"]["Value"][0]
    assert value["Alphabetic"] == groups[0]
    if len(groups) > 1:
        assert value["Ideographic"] == groups[1]
    if len(groups) > 2:
        assert value["Phonetic"] == groups[2]


def test_character_set_of_a_sequence_item() -> None:
    parsed = _parse(_charset("chrSQEncoding.dcm"))
    item = parsed.metadata["00321064"]["Value"][0]
    assert item["00100010"]["Value"][0] == {
        "Alphabetic": "ﾔﾏﾀﾞ^ﾀﾛｳ",
        "Ideographic": "山田^太郎",
        "Phonetic": "やまだ^たろう",
    }
    assert parsed.metadata["00321032"]["Value"][0] == {"Alphabetic": "Doctor^Who^^MD"}
    # No SOP Instance UID in the dataset: the file meta's is used.
    assert parsed.instance.sop_instance_uid == "1.3.12.2.1107.5.2.30.25663.200903310936104516220362"


# -- odd and broken data ---------------------------------------------------------


def _part10(ds: Dataset, *, implicit: bool = False) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"))
    ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.get("SOPInstanceUID", generate_uid()))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _base_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "ODD1"
    ds.Modality = "OT"
    return ds


def _replace_value(data: bytes, tag: int, vr: bytes, value: bytes) -> bytes:
    """``data`` with the (explicit VR, 16-bit length) value of ``tag`` replaced
    by ``value`` of the same length."""
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    at = data.index(header)
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    assert len(value) == length, (value, length)
    return data[: at + 8] + value + data[at + 8 + length :]


def test_invalid_values_and_wrong_charset_do_not_stop_indexing() -> None:
    ds = _base_dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Good^Name^"
    ds.InstanceNumber = "777"
    ds.PixelSpacing = ["0.5", "0.25"]
    ds.SeriesNumber = "88888888888"
    ds.StudyDescription = "Study#Desc"
    data = _part10(ds)
    # Corrupt the values in place, keeping their lengths.
    data = _replace_value(data, 0x00100010, b"PN", b"Bad\xff\xfeName ")  # not UTF-8
    data = _replace_value(data, 0x00200013, b"IS", b"12a ")  # not an integer
    data = _replace_value(data, 0x00280030, b"DS", b"0.5\\abcd")  # half a number
    data = _replace_value(data, 0x00081030, b"LO", b"Study\x00Desc")  # a NUL inside text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=THRESHOLD)
    assert parsed.patient.patient_name is not None and parsed.patient.patient_name.startswith("Bad")
    assert parsed.instance.instance_number is None
    assert parsed.series.series_number is None  # beyond int32
    assert parsed.study.study_description == "StudyDesc"
    assert parsed.metadata["00280030"]["Value"][0] == 0.5
    json.dumps(parsed.metadata, allow_nan=False)
    assert "\\u0000" not in json.dumps(parsed.metadata)


def test_large_values_in_sequences_and_long_text() -> None:
    ds = _base_dataset()
    item = Dataset()
    item.add_new(0x00091010, "LO", "PRIVATE CREATOR")
    item.add_new(0x00091011, "OB", bytes(range(256)) * 20)  # 5 kB, above the threshold
    item.add_new(0x00091012, "OB", b"\x01\x02")  # small, inline
    ds.add_new(0x00091001, "SQ", Sequence([item]))
    long_text = "x" * 100_000  # deferred by the reader (> 64 kB), inline in JSON
    ds.add_new(0x00400441, "UT", long_text)
    ds.PixelData = bytes(64 * 64)
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = 8
    ds.add_new(0x7FE10010, "LO", "AFTER PIXELS")  # a private element after Pixel Data
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 16)  # trailing padding
    parsed = parse_for_index(io.BytesIO(_part10(ds)), bulk_data_threshold=THRESHOLD)
    sequence_item = parsed.metadata["00091001"]["Value"][0]
    assert sequence_item["00091011"] == {"vr": "OB", "BulkDataURI": "bulkdata/00091001/0/00091011"}
    assert base64.b64decode(sequence_item["00091012"]["InlineBinary"]) == b"\x01\x02"
    assert parsed.metadata["00400441"] == {"vr": "UT", "Value": [long_text]}
    assert parsed.metadata["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"
    assert parsed.metadata["7FE10010"]["Value"] == ["AFTER PIXELS"]
    assert "FFFCFFFC" not in parsed.metadata
    assert list(parsed.metadata) == sorted(parsed.metadata)


def test_implicit_vr_private_tags_become_un() -> None:
    ds = _base_dataset()
    ds.add_new(0x00111001, "OB", b"\x00" * 4000)  # no private creator: VR unknown when implicit
    parsed = parse_for_index(io.BytesIO(_part10(ds, implicit=True)), bulk_data_threshold=THRESHOLD)
    assert parsed.metadata["00111001"]["vr"] == "UN"
    assert "BulkDataURI" in parsed.metadata["00111001"]


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world", b"\x00" * 200, b"\x00" * 128 + b"DICM" + b"\xff" * 50],
    ids=["empty", "text", "zeros", "garbage-after-preamble"],
)
def test_not_dicom(data: bytes) -> None:
    with pytest.raises(NotDicomError):
        parse_for_index(io.BytesIO(data), bulk_data_threshold=THRESHOLD)


def test_dataset_without_uids_is_not_indexable() -> None:
    ds = Dataset()
    ds.PatientName = "No^Uids"
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    with pytest.raises(InvalidInstanceError):
        parse_for_index(io.BytesIO(buffer.getvalue()), bulk_data_threshold=THRESHOLD)
