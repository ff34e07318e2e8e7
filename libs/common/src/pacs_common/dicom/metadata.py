"""Parsing a stored Part 10 object for the index: the one place it happens.

The ingest worker reads each object exactly once, here.  Reading stops before
Pixel Data and large values are never loaded (they are *deferred*: pydicom
records where they are and seeks past them), so a 2 GB multi-frame costs what
its header costs.  What comes out:

* the attributes the index stores per level (patient, study, series,
  instance), decoded to ``str`` through the object's Specific Character Set;
* the DICOM JSON model (PS3.18 F.2) of the whole dataset with every bulk
  value (binary VRs over the threshold, and Pixel Data always) replaced by a
  ``BulkDataURI`` of the form ``bulkdata/{tag path}``, relative to the
  instance's WADO-RS URL, which the DICOMweb service resolves;
* a catalogue of those bulk values with their byte offset and length in the
  stored object, so they can be served with a ranged read instead of a parse.

Real-world data is messy: a value that cannot be decoded must not stop an
instance from being indexed.  Each element is converted on its own; one that
fails is kept as raw bytes (or dropped) and noted in ``ParsedInstance.warnings``.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import struct
from collections.abc import Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, cast

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName

__all__ = [
    "BULK_DATA_URI_PREFIX",
    "BulkDataRef",
    "InstanceAttributes",
    "InvalidInstanceError",
    "NotDicomError",
    "ParsedInstance",
    "PatientAttributes",
    "SeriesAttributes",
    "StudyAttributes",
    "normalize_for_matching",
    "parse_for_index",
]

logger = logging.getLogger(__name__)

#: ``BulkDataURI`` values are ``bulkdata/`` + the tag path, e.g.
#: ``bulkdata/7FE00010`` or ``bulkdata/00880200/0/7FE00010`` (tag / item index / tag).
BULK_DATA_URI_PREFIX: Final = "bulkdata/"

_PIXEL_DATA_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_PIXEL_DATA_VR: Final = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Binary VRs whose JSON InlineBinary is little endian words of this size.
_WORD_SIZE: Final = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_INT_VRS: Final = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS: Final = frozenset({"FL", "FD"})
# Fast path (the common case, decoded here rather than through pydicom's
# per-element machinery, with pydicom's semantics): struct codes of binary
# numbers, ...
_STRUCT_CODES: Final = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "UV": "Q",
    "SV": "q",
    "FL": "f",
    "FD": "d",
}
# ... ASCII VRs (default repertoire whatever the character set) ...
_ASCII_VRS: Final = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
# ... and text VRs in the dataset's character set, unless ISO 2022 escapes are used.
_MULTI_TEXT_VRS: Final = frozenset({"SH", "LO", "UC", "PN"})
_SINGLE_TEXT_VRS: Final = frozenset({"ST", "LT", "UT"})
_ESC: Final = 0x1B
_TRAILING_PADDING: Final = 0xFFFCFFFC
_ITEM_TAG: Final = 0xFFFEE000
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
# Values longer than this are never read into memory, whatever the bulk data
# threshold: the memory bound of parsing one object.
_MIN_DEFER_BYTES: Final = 64 * 1024
_INT32_MAX: Final = 2**31 - 1

# Well-known tags (group << 16 | element), read from the JSON model.
_SPECIFIC_CHARACTER_SET = "00080005"
_IMAGE_TYPE = "00080008"
_SOP_CLASS_UID = "00080016"
_SOP_INSTANCE_UID = "00080018"
_STUDY_DATE = "00080020"
_SERIES_DATE = "00080021"
_CONTENT_DATE = "00080023"
_ACQUISITION_DATETIME = "0008002A"
_STUDY_TIME = "00080030"
_SERIES_TIME = "00080031"
_CONTENT_TIME = "00080033"
_ACCESSION_NUMBER = "00080050"
_ISSUER_OF_ACCESSION_NUMBER_SEQUENCE = "00080051"
_MODALITY = "00080060"
_INSTITUTION_NAME = "00080080"
_REFERRING_PHYSICIAN_NAME = "00080090"
_STATION_NAME = "00081010"
_STUDY_DESCRIPTION = "00081030"
_SERIES_DESCRIPTION = "0008103E"
_INSTITUTIONAL_DEPARTMENT_NAME = "00081040"
_PERFORMING_PHYSICIAN_NAME = "00081050"
_OPERATORS_NAME = "00081070"
_MANUFACTURER = "00080070"
_MANUFACTURER_MODEL_NAME = "00081090"
_PATIENT_NAME = "00100010"
_PATIENT_ID = "00100020"
_ISSUER_OF_PATIENT_ID = "00100021"
_PATIENT_BIRTH_DATE = "00100030"
_PATIENT_SEX = "00100040"
_OTHER_PATIENT_IDS = "00101000"
_OTHER_PATIENT_IDS_SEQUENCE = "00101002"
_PATIENT_AGE = "00101010"
_PATIENT_SIZE = "00101020"
_PATIENT_WEIGHT = "00101030"
_PATIENT_COMMENTS = "00104000"
_BODY_PART_EXAMINED = "00180015"
_PROTOCOL_NAME = "00181030"
_STUDY_INSTANCE_UID = "0020000D"
_SERIES_INSTANCE_UID = "0020000E"
_STUDY_ID = "00200010"
_SERIES_NUMBER = "00200011"
_INSTANCE_NUMBER = "00200013"
_LATERALITY = "00200060"
_IMAGE_LATERALITY = "00200062"
_NUMBER_OF_FRAMES = "00280008"
_ROWS = "00280010"
_COLUMNS = "00280011"
_BITS_ALLOCATED = "00280100"
_PHOTOMETRIC_INTERPRETATION = "00280004"
_LOCAL_NAMESPACE_ENTITY_ID = "00400031"
_PPS_START_DATE = "00400244"
_PPS_START_TIME = "00400245"
_REQUEST_ATTRIBUTES_SEQUENCE = "00400275"
_CONCEPT_NAME_CODE_SEQUENCE = "0040A043"
_COMPLETION_FLAG = "0040A491"
_VERIFICATION_FLAG = "0040A493"

# Items of Request Attributes Sequence kept for series-level matching.
_REQUEST_ATTRIBUTE_KEYS: Final = {
    "00400009": "ScheduledProcedureStepID",
    "00401001": "RequestedProcedureID",
    "00080050": "AccessionNumber",
    "0020000D": "StudyInstanceUID",
    "00321060": "RequestedProcedureDescription",
    "00400007": "ScheduledProcedureStepDescription",
}
_CODE_KEYS: Final = {
    "00080100": "CodeValue",
    "00080102": "CodingSchemeDesignator",
    "00080103": "CodingSchemeVersion",
    "00080104": "CodeMeaning",
}


class NotDicomError(ValueError):
    """The object is not a DICOM dataset pydicom can read (permanent)."""


class InvalidInstanceError(NotDicomError):
    """The object is DICOM but cannot be indexed, e.g. it has no SOP Instance UID."""


def normalize_for_matching(value: str | None) -> str | None:
    """The form of a value used for case-insensitive matching.

    The index stores ``*_norm`` columns made with this function; whoever
    matches against them must normalize the query value the same way.
    """
    if value is None:
        return None
    return value.upper()


@dataclass(slots=True)
class BulkDataRef:
    """Where a bulk value lies in the stored object.

    ``offset`` is the position of the value's first byte (after the element
    header); ``length`` is None for an undefined length (encapsulated Pixel
    Data), whose item ``fragments`` ([offset, length] of each item value,
    the Basic Offset Table first) are listed instead when they could be
    scanned.  Offsets are None when they do not exist in the stored object
    (deflated transfer syntax).
    """

    vr: str
    offset: int | None
    length: int | None
    fragments: list[tuple[int, int]] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vr": self.vr, "offset": self.offset, "length": self.length}
        if self.fragments is not None:
            out["fragments"] = [list(f) for f in self.fragments]
        return out


@dataclass(slots=True)
class PatientAttributes:
    # Key of the patient row: empty string, never None, when absent.
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str | None = None
    patient_name_norm: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    other_patient_ids: str | None = None
    patient_comments: str | None = None
    specific_character_set: str | None = None


@dataclass(slots=True)
class StudyAttributes:
    study_instance_uid: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    issuer_of_accession_number: str | None = None
    study_id: str | None = None
    referring_physician_name: str | None = None
    referring_physician_name_norm: str | None = None
    study_description: str | None = None
    patient_age: str | None = None
    patient_size: str | None = None
    patient_weight: str | None = None
    institution_name: str | None = None
    specific_character_set: str | None = None


@dataclass(slots=True)
class SeriesAttributes:
    series_instance_uid: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    series_date: str | None = None
    series_time: str | None = None
    body_part_examined: str | None = None
    laterality: str | None = None
    protocol_name: str | None = None
    station_name: str | None = None
    institution_name: str | None = None
    institutional_department_name: str | None = None
    performing_physician_name: str | None = None
    operators_name: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    performed_procedure_step_start_date: str | None = None
    performed_procedure_step_start_time: str | None = None
    # Request Attributes Sequence items as {keyword: value}, for jsonb containment matching.
    request_attributes: list[dict[str, str]] | None = None


@dataclass(slots=True)
class InstanceAttributes:
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    instance_number: int | None = None
    content_date: str | None = None
    content_time: str | None = None
    acquisition_datetime: str | None = None
    number_of_frames: int | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    photometric_interpretation: str | None = None
    image_type: str | None = None
    completion_flag: str | None = None
    verification_flag: str | None = None
    concept_name_code: dict[str, str] | None = None
    specific_character_set: str | None = None


@dataclass(slots=True)
class ParsedInstance:
    """Everything the index needs from one object."""

    # From the file meta, or inferred from the encoding when there is none.
    transfer_syntax_uid: str
    has_file_meta: bool
    patient: PatientAttributes
    study: StudyAttributes
    series: SeriesAttributes
    instance: InstanceAttributes
    # DICOM JSON model of the dataset (no file meta, no bulk data).
    metadata: dict[str, Any]
    # BulkDataURI path (without the prefix) → where the value is in the object.
    bulk_data: dict[str, BulkDataRef] = field(default_factory=dict)
    # Per-element problems met while parsing (the instance was indexed anyway).
    warnings: list[str] = field(default_factory=list)

    def bulk_data_json(self) -> dict[str, Any]:
        return {path: ref.to_json() for path, ref in self.bulk_data.items()}


# ---------------------------------------------------------------------------
# Streams


class _ForwardReader(io.RawIOBase):
    """Makes a forward-only stream (an HTTP body) look seekable to pydicom.

    pydicom seeks backwards only a few bytes at a time (peeking at a tag, or
    rewinding to the start of a missing preamble) and forwards past deferred
    values; a window of recent bytes serves the first, reading and
    discarding serves the second.  Seeking further back raises.
    """

    _WINDOW = 256 * 1024
    _CHUNK = 1024 * 1024

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._buf = bytearray()  # holds bytes [_buf_start, _buf_start + len(_buf))
        self._buf_start = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _buf_end(self) -> int:
        return self._buf_start + len(self._buf)

    def _discard_to(self, target: int) -> None:
        while self._buf_end() < target:
            chunk = self._raw.read(min(target - self._buf_end(), self._CHUNK))
            if not chunk:
                return
            self._buf_start = self._buf_end() + len(chunk)
            self._buf.clear()

    def read(self, size: int | None = -1) -> bytes:
        if self._pos > self._buf_end():
            self._discard_to(self._pos)
            if self._pos > self._buf_end():
                return b""
        want = None if size is None or size < 0 else self._pos + size
        while want is None or self._buf_end() < want:
            chunk = self._raw.read(self._CHUNK if want is None else want - self._buf_end())
            if not chunk:
                break
            self._buf += chunk
        start = self._pos - self._buf_start
        stop = len(self._buf) if want is None else start + (want - self._pos)
        data = bytes(self._buf[start:stop])
        self._pos += len(data)
        excess = self._pos - self._buf_start - self._WINDOW
        if excess > 0:
            del self._buf[:excess]
            self._buf_start += excess
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("cannot seek from the end of a forward-only stream")
        if offset < self._buf_start:
            raise io.UnsupportedOperation("cannot seek back that far in a forward-only stream")
        self._pos = offset
        return offset


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------
# Parsing


class _Walker:
    """Converts a dataset to the DICOM JSON model, one element at a time."""

    def __init__(
        self,
        stream: BinaryIO,
        *,
        threshold: int,
        is_little_endian: bool,
        offsets_valid: bool,
    ) -> None:
        self.stream = stream
        self.threshold = threshold
        self.is_little_endian = is_little_endian
        self.offsets_valid = offsets_valid
        self.bulk_data: dict[str, BulkDataRef] = {}
        self.warnings: list[str] = []

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    # -- datasets and elements ------------------------------------------------

    def dataset(
        self, ds: Dataset, prefix: str, out: dict[str, Any] | None = None, *, base: int = 0
    ) -> dict[str, Any]:
        """``base``: where the bytes ``ds``'s element positions count from
        begin in the stored object (items of a sequence pydicom parsed from
        the sequence's value bytes count from that value's start)."""
        result: dict[str, Any] = {} if out is None else out
        try:
            encoding = ds._character_set
        except Exception as exc:
            self.warn(prefix or "00080005", f"Specific Character Set not usable: {exc}")
            encoding = "iso8859"
        for tag in sorted(ds.keys()):
            number = int(tag)
            if number & 0xFFFF == 0 or number >> 16 in (0x0000, 0x0002) or number == _TRAILING_PADDING:
                continue  # group lengths, command and file meta groups are not dataset content
            key = f"{number:08X}"
            path = f"{prefix}{key}"
            try:
                elem = ds.get_item(tag, keep_deferred=True)
                if elem is None:
                    continue
                converted = self.element(elem, ds, encoding, path, base)
            except Exception as exc:  # one bad element must not lose the instance
                self.warn(path, f"dropped: {type(exc).__name__}: {exc}")
                continue
            if converted is not None:
                result[key] = converted
        return result

    def element(
        self,
        elem: DataElement | RawDataElement,
        ds: Dataset,
        encoding: str | MutableSequence[str],
        path: str,
        base: int,
    ) -> dict[str, Any] | None:
        item_base = base
        if isinstance(elem, RawDataElement):
            if elem.value is None and elem.length not in (0, 0xFFFFFFFF):
                return self.deferred(elem, ds, encoding, path)
            fast = self.fast(elem, encoding, path, base)
            if fast is not None:
                return fast
            # A sequence converted from its value bytes: item positions count
            # from the value's first byte.
            item_base = base + (elem.value_tell or 0)
            elem = self.convert(elem, ds, encoding, path)
        vr = self.resolve_vr(elem, ds, path)
        value = elem.value
        if vr == "SQ":
            items = [
                self.dataset(item, f"{path}/{index}/", base=item_base)
                for index, item in enumerate(cast(list[Dataset], value or []))
            ]
            return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        if vr in _BINARY_VRS or int(elem.tag) in _PIXEL_DATA_TAGS:
            return self.binary(elem, vr, path, base)
        return _json_value(vr, _values(value), path, self)

    def fast(
        self, raw: RawDataElement, encoding: str | MutableSequence[str], path: str, base: int
    ) -> dict[str, Any] | None:
        """The JSON of a plain element decoded directly, or None to let
        pydicom convert it (private VR lookup, ISO 2022, sequences, odd data)."""
        vr = raw.VR
        if vr is None:
            vr = _dictionary_vr(int(raw.tag))
            if vr is None:
                return None
        elif vr == "UN":
            return None  # pydicom replaces UN by the dictionary VR when it knows the tag
        value = raw.value
        if not isinstance(value, bytes):
            return None
        if not value:
            return {"vr": vr}
        if vr in _BINARY_VRS and int(raw.tag) not in _PIXEL_DATA_TAGS:
            offset = None if raw.value_tell is None else base + raw.value_tell
            return self.binary_value(value, vr, path, offset)
        values: list[Any]
        code = _STRUCT_CODES.get(vr)
        if code is not None:
            size = struct.calcsize("<" + code)  # standard sizes, not the platform's
            if len(value) % size:
                return None  # pydicom's conversion will report it
            endian = "<" if raw.is_little_endian else ">"
            values = list(struct.unpack(f"{endian}{len(value) // size}{code}", value))
            return _json_value(vr, values, path, self)
        if vr in _ASCII_VRS:
            text = value.decode("latin-1")
            if vr == "AE":
                values = [v.strip() for v in text.split("\\")]
            elif vr == "UR":
                values = [text.rstrip()]
            else:
                values = [v.strip() for v in text.rstrip(" \x00").split("\\")]
            return _json_value(vr, values, path, self)
        if vr in _MULTI_TEXT_VRS or vr in _SINGLE_TEXT_VRS:
            if _ESC in value:
                return None  # ISO 2022 code extensions: pydicom switches charsets
            codec = encoding if isinstance(encoding, str) else encoding[0]
            if vr == "PN":
                value = value.rstrip(b"\x00 ")
            try:
                text = value.decode(codec)
            except LookupError:
                return None
            except UnicodeDecodeError:
                self.warn(path, f"{vr} value not valid in {codec}: decoded with replacement characters")
                text = value.decode(codec, errors="replace")
            if vr in _SINGLE_TEXT_VRS:
                values = [text.rstrip("\x00 ")]
            else:
                values = [v.rstrip("\x00 ") for v in text.split("\\")]
            return _json_value(vr, values, path, self)
        return None

    def convert(
        self, raw: RawDataElement, ds: Dataset, encoding: str | MutableSequence[str], path: str
    ) -> DataElement:
        try:
            return convert_raw_data_element(raw, encoding=encoding, ds=ds)
        except Exception as exc:
            self.warn(path, f"kept as UN, value not convertible: {type(exc).__name__}: {exc}")
            return DataElement(raw.tag, "UN", raw.value or b"", raw.value_tell, already_converted=True)

    def resolve_vr(self, elem: DataElement, ds: Dataset, path: str) -> str:
        vr = str(elem.VR)
        if " or " in vr:
            try:
                elem = cast(DataElement, correct_ambiguous_vr_element(elem, ds, self.is_little_endian))
                vr = str(elem.VR)
            except Exception as exc:
                self.warn(path, f"ambiguous VR {vr} not resolved: {exc}")
            if " or " in vr:
                vr = vr.split(" or ")[0]
        return vr

    def deferred(
        self, raw: RawDataElement, ds: Dataset, encoding: str | MutableSequence[str], path: str
    ) -> dict[str, Any] | None:
        """A value too large to have been read: bulk data, or text read now."""
        vr = raw.VR
        if vr is None:  # implicit VR: the dictionary's, or UN for private tags
            try:
                vr = dictionary_VR(raw.tag)
            except KeyError:
                vr = "UN"
        vr = vr.split(" or ")[0] if " or " in vr else vr
        if vr in _BINARY_VRS or int(raw.tag) in _PIXEL_DATA_TAGS:
            return self.bulk(path, vr, raw.value_tell, raw.length)
        # A long text or number list: the JSON model wants it inline, so read it.
        value = self.read_at(raw.value_tell, raw.length)
        if value is None:
            self.warn(path, f"{vr} value of {raw.length} bytes left as bulk data (stream not seekable)")
            return self.bulk(path, vr, raw.value_tell, raw.length)
        loaded = RawDataElement(
            raw.tag, raw.VR, raw.length, value, raw.value_tell, raw.is_implicit_VR, raw.is_little_endian
        )
        return self.element(loaded, ds, encoding, path, 0)

    def read_at(self, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of the parsed stream, position kept."""
        try:
            here = self.stream.tell()
            self.stream.seek(offset)
            data = self.stream.read(length)
            self.stream.seek(here)
        except (OSError, io.UnsupportedOperation):
            return None
        return data if len(data) == length else None

    def binary(self, elem: DataElement, vr: str, path: str, base: int) -> dict[str, Any]:
        value = elem.value
        offset = None if elem.file_tell is None else base + elem.file_tell
        if int(elem.tag) in _PIXEL_DATA_TAGS:
            # Pixel Data inside a sequence (icons) is read by pydicom; still bulk.
            length = len(value) if isinstance(value, bytes | bytearray) else None
            return self.bulk(path, vr, offset, length)
        if value is None:
            return {"vr": vr}
        if not isinstance(value, bytes | bytearray):
            # UN with an odd value, e.g. a list; keep what JSON can hold.
            return _json_value(vr, _values(value), path, self)
        return self.binary_value(bytes(value), vr, path, offset)

    def binary_value(self, data: bytes, vr: str, path: str, offset: int | None) -> dict[str, Any]:
        if len(data) > self.threshold:
            return self.bulk(path, vr, offset, len(data))
        if not data:
            return {"vr": vr}
        size = _WORD_SIZE.get(vr)
        if size and not self.is_little_endian and len(data) % size == 0:
            data = _swap_words(data, size)
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("ascii")}

    def bulk(self, path: str, vr: str, offset: int | None, length: int | None) -> dict[str, Any]:
        self.bulk_data[path] = BulkDataRef(
            vr=vr, offset=offset if self.offsets_valid else None, length=length
        )
        return {"vr": vr, "BulkDataURI": BULK_DATA_URI_PREFIX + path}


_VR_CACHE: dict[int, str | None] = {}


def _dictionary_vr(tag: int) -> str | None:
    """The dictionary VR of a standard tag (None: private, unknown or
    ambiguous, for pydicom to resolve in context)."""
    try:
        return _VR_CACHE[tag]
    except KeyError:
        pass
    vr: str | None
    try:
        vr = None if tag >> 16 & 1 else str(dictionary_VR(tag))
    except KeyError:
        vr = None
    if vr is not None and " or " in vr:
        vr = None
    _VR_CACHE[tag] = vr
    return vr


def _swap_words(data: bytes, size: int) -> bytes:
    out = bytearray(len(data))
    for i in range(size):
        out[i::size] = data[size - 1 - i :: size]
    return bytes(out)


def _clean(text: str) -> str:
    """Text PostgreSQL can store: no NUL, no lone surrogates."""
    if text.isascii():
        return text.replace("\x00", "") if "\x00" in text else text
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _number(vr: str, v: Any) -> Any:
    if v is None or v == "":
        return None
    if vr in _INT_VRS:
        return int(v)
    if vr == "IS":
        try:
            return int(v)
        except (TypeError, ValueError):
            return _clean(str(v)).strip() or None  # invalid IS: keep as received
    try:
        number = float(v)
    except (TypeError, ValueError):
        return _clean(str(v)).strip() or None  # invalid DS: keep as received
    if not math.isfinite(number):
        return None  # JSON (and jsonb) have no NaN/Infinity
    if vr == "DS" and number.is_integer() and abs(number) < 2**53:
        original = str(v).strip()
        if "." not in original and "e" not in original.lower():
            return int(number)
    return number


def _person_name(v: Any) -> dict[str, str] | None:
    groups: Sequence[str]
    if isinstance(v, PersonName):
        groups = (v.alphabetic, v.ideographic, v.phonetic)
    else:
        groups = _clean(str(v)).split("=")[:3]
    out = {
        name: _clean(group)
        for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
        if group
    }
    return out or None


def _json_value(vr: str, items: list[Any], path: str, walker: _Walker) -> dict[str, Any]:
    if not items:
        return {"vr": vr}
    converted: list[Any]
    if (vr in _FLOAT_VRS or vr in _INT_VRS or vr == "AT") and not all(
        v is None or isinstance(v, int | float) for v in items
    ):
        # pydicom leaves a binary number whose length is not a multiple of
        # its size as raw bytes: not a value JSON (or the index) can hold.
        walker.warn(path, f"{vr} value not a whole number of values: dropped")
        items = [v if isinstance(v, int | float) else None for v in items]
    if vr in _FLOAT_VRS:
        converted = [v if v is None or math.isfinite(v) else None for v in items]
    elif vr in _INT_VRS:
        converted = items
    elif vr == "PN":
        converted = [_person_name(v) for v in items]
    elif vr == "AT":
        converted = [f"{int(v):08X}" if v is not None else None for v in items]
    elif vr in ("IS", "DS"):
        converted = []
        for v in items:
            try:
                converted.append(_number(vr, v))
            except (TypeError, ValueError, OverflowError) as exc:
                walker.warn(path, f"{vr} value {v!r} not a number: {exc}")
                converted.append(None)
    else:
        converted = []
        for v in items:
            if isinstance(v, bytes | bytearray):
                walker.warn(path, f"{vr} value left undecoded")
                text = _clean(bytes(v).decode("latin-1"))
            elif isinstance(v, str):
                text = _clean(v)
            else:
                text = "" if v is None else _clean(str(v))
            converted.append(text or None)
    for v in converted:
        if v is not None:
            return {"vr": vr, "Value": converted}
    return {"vr": vr}


def _element_header(
    stream: BinaryIO, *, implicit: bool, little: bool
) -> tuple[int, str, int, int | None] | None:
    """Read the header of the element at the stream position: (tag, vr,
    value offset, value length or None when undefined)."""
    start = stream.tell()
    head = stream.read(8)
    if len(head) < 8:
        return None
    endian = "<" if little else ">"
    group, element = struct.unpack(f"{endian}HH", head[:4])
    tag = group << 16 | element
    if implicit:
        (length,) = struct.unpack(f"{endian}L", head[4:])
        vr = _PIXEL_DATA_VR.get(tag, "UN")
        offset = start + 8
    else:
        vr = head[4:6].decode("latin-1")
        if vr in EXPLICIT_VR_LENGTH_32:
            extra = stream.read(4)
            if len(extra) < 4:
                return None
            (length,) = struct.unpack(f"{endian}L", extra)
            offset = start + 12
        else:
            (length,) = struct.unpack(f"{endian}H", head[6:])
            offset = start + 8
    return tag, vr, offset, (None if length == 0xFFFFFFFF else length)


def _scan_fragments(stream: BinaryIO, *, little: bool) -> list[tuple[int, int]]:
    """Skip the items of an encapsulated value, returning each item's value
    offset and length; leaves the stream after the sequence delimiter."""
    endian = "<" if little else ">"
    fragments: list[tuple[int, int]] = []
    while True:
        head = stream.read(8)
        if len(head) < 8:
            raise EOFError("encapsulated value ends without a sequence delimiter")
        group, element, length = struct.unpack(f"{endian}HHL", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return fragments
        if tag != _ITEM_TAG or length == 0xFFFFFFFF:
            raise ValueError(f"unexpected tag {tag:08X} in encapsulated value")
        offset = stream.tell()
        fragments.append((offset, length))
        stream.seek(offset + length)


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_DATA_TAGS


def _trailing_elements(
    stream: BinaryIO,
    walker: _Walker,
    *,
    implicit: bool,
    little: bool,
    defer_size: int,
    encoding: str | MutableSequence[str],
    out: dict[str, Any],
    locate_fragments: bool,
) -> None:
    """Pixel Data, and whatever follows it, without reading any of its value.

    pydicom stops *before* the Pixel Data element; its header tells where the
    value is, then reading resumes after it (a few datasets carry elements
    after Pixel Data: trailing padding, signatures, private tags).
    """
    for _ in range(8):  # at most a few pixel data elements (7FE0,0008/0009/0010)
        header = _element_header(stream, implicit=implicit, little=little)
        if header is None:
            return
        tag, vr, offset, length = header
        if tag not in _PIXEL_DATA_TAGS:
            return
        key = f"{tag:08X}"
        ref = BulkDataRef(vr=vr, offset=offset if walker.offsets_valid else None, length=length)
        walker.bulk_data[key] = ref
        out[key] = {"vr": vr, "BulkDataURI": BULK_DATA_URI_PREFIX + key}
        try:
            if length is None:
                if not locate_fragments:
                    return  # nothing after encapsulated Pixel Data is looked for
                fragments = _scan_fragments(stream, little=little)
                if walker.offsets_valid:
                    ref.fragments = fragments
            else:
                stream.seek(offset + length)
            if not stream.read(1):
                return
            stream.seek(-1, io.SEEK_CUR)
            rest = read_dataset(
                stream,
                implicit,
                little,
                stop_when=_at_pixel_data,
                defer_size=defer_size,
                parent_encoding=encoding,
            )
        except Exception as exc:
            walker.warn(key, f"elements after it not read: {type(exc).__name__}: {exc}")
            return
        walker.dataset(rest, "", out)


def _text(metadata: dict[str, Any], key: str) -> str | None:
    """A value as a DICOM string: multiple values joined with backslash,
    PN component groups joined with '=', leading/trailing spaces dropped."""
    element = metadata.get(key)
    if not element:
        return None
    values = element.get("Value")
    if not values:
        return None
    parts: list[str] = []
    for v in values:
        if v is None:
            parts.append("")
        elif isinstance(v, dict):
            groups = [v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]
            while groups and not groups[-1]:
                groups.pop()
            parts.append("=".join(groups))
        elif isinstance(v, float) and v.is_integer():
            parts.append(str(int(v)))
        else:
            parts.append(str(v))
    text = "\\".join(parts).strip()
    return text or None


def _integer(metadata: dict[str, Any], key: str) -> int | None:
    element = metadata.get(key)
    values = element.get("Value") if element else None
    if not values:
        return None
    v = values[0]
    try:
        number = int(v) if not isinstance(v, str) else int(float(v.strip()))
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -_INT32_MAX - 1 <= number <= _INT32_MAX else None


def _items(metadata: dict[str, Any], key: str) -> Iterator[dict[str, Any]]:
    element = metadata.get(key)
    for item in (element or {}).get("Value") or []:
        if isinstance(item, dict):
            yield item


def _picked(item: dict[str, Any], keys: dict[str, str]) -> dict[str, str]:
    picked: dict[str, str] = {}
    for tag, keyword in keys.items():
        text = _text(item, tag)
        if text is not None:
            picked[keyword] = text
    return picked


def _index_attributes(
    metadata: dict[str, Any],
) -> tuple[PatientAttributes, StudyAttributes, SeriesAttributes, InstanceAttributes]:
    charset = _text(metadata, _SPECIFIC_CHARACTER_SET)
    other_ids = _text(metadata, _OTHER_PATIENT_IDS)
    if other_ids is None:
        ids = [_text(item, _PATIENT_ID) for item in _items(metadata, _OTHER_PATIENT_IDS_SEQUENCE)]
        other_ids = "\\".join(i for i in ids if i) or None
    patient_name = _text(metadata, _PATIENT_NAME)
    patient = PatientAttributes(
        patient_id=_text(metadata, _PATIENT_ID) or "",
        issuer_of_patient_id=_text(metadata, _ISSUER_OF_PATIENT_ID) or "",
        patient_name=patient_name,
        patient_name_norm=normalize_for_matching(patient_name),
        patient_birth_date=_text(metadata, _PATIENT_BIRTH_DATE),
        patient_sex=_text(metadata, _PATIENT_SEX),
        other_patient_ids=other_ids,
        patient_comments=_text(metadata, _PATIENT_COMMENTS),
        specific_character_set=charset,
    )
    issuer_of_accession = next(
        (
            _text(item, _LOCAL_NAMESPACE_ENTITY_ID)
            for item in _items(metadata, _ISSUER_OF_ACCESSION_NUMBER_SEQUENCE)
        ),
        None,
    )
    referring = _text(metadata, _REFERRING_PHYSICIAN_NAME)
    study = StudyAttributes(
        study_instance_uid=_text(metadata, _STUDY_INSTANCE_UID),
        study_date=_text(metadata, _STUDY_DATE),
        study_time=_text(metadata, _STUDY_TIME),
        accession_number=_text(metadata, _ACCESSION_NUMBER),
        issuer_of_accession_number=issuer_of_accession,
        study_id=_text(metadata, _STUDY_ID),
        referring_physician_name=referring,
        referring_physician_name_norm=normalize_for_matching(referring),
        study_description=_text(metadata, _STUDY_DESCRIPTION),
        patient_age=_text(metadata, _PATIENT_AGE),
        patient_size=_text(metadata, _PATIENT_SIZE),
        patient_weight=_text(metadata, _PATIENT_WEIGHT),
        institution_name=_text(metadata, _INSTITUTION_NAME),
        specific_character_set=charset,
    )
    requests = [
        picked
        for item in _items(metadata, _REQUEST_ATTRIBUTES_SEQUENCE)
        if (picked := _picked(item, _REQUEST_ATTRIBUTE_KEYS))
    ]
    series = SeriesAttributes(
        series_instance_uid=_text(metadata, _SERIES_INSTANCE_UID),
        modality=_text(metadata, _MODALITY),
        series_number=_integer(metadata, _SERIES_NUMBER),
        series_description=_text(metadata, _SERIES_DESCRIPTION),
        series_date=_text(metadata, _SERIES_DATE),
        series_time=_text(metadata, _SERIES_TIME),
        body_part_examined=_text(metadata, _BODY_PART_EXAMINED),
        laterality=_text(metadata, _LATERALITY) or _text(metadata, _IMAGE_LATERALITY),
        protocol_name=_text(metadata, _PROTOCOL_NAME),
        station_name=_text(metadata, _STATION_NAME),
        institution_name=_text(metadata, _INSTITUTION_NAME),
        institutional_department_name=_text(metadata, _INSTITUTIONAL_DEPARTMENT_NAME),
        performing_physician_name=_text(metadata, _PERFORMING_PHYSICIAN_NAME),
        operators_name=_text(metadata, _OPERATORS_NAME),
        manufacturer=_text(metadata, _MANUFACTURER),
        manufacturer_model_name=_text(metadata, _MANUFACTURER_MODEL_NAME),
        performed_procedure_step_start_date=_text(metadata, _PPS_START_DATE),
        performed_procedure_step_start_time=_text(metadata, _PPS_START_TIME),
        request_attributes=requests or None,
    )
    concept = next(
        (p for item in _items(metadata, _CONCEPT_NAME_CODE_SEQUENCE) if (p := _picked(item, _CODE_KEYS))),
        None,
    )
    instance = InstanceAttributes(
        sop_instance_uid=_text(metadata, _SOP_INSTANCE_UID),
        sop_class_uid=_text(metadata, _SOP_CLASS_UID),
        instance_number=_integer(metadata, _INSTANCE_NUMBER),
        content_date=_text(metadata, _CONTENT_DATE),
        content_time=_text(metadata, _CONTENT_TIME),
        acquisition_datetime=_text(metadata, _ACQUISITION_DATETIME),
        number_of_frames=_integer(metadata, _NUMBER_OF_FRAMES),
        rows=_integer(metadata, _ROWS),
        columns=_integer(metadata, _COLUMNS),
        bits_allocated=_integer(metadata, _BITS_ALLOCATED),
        photometric_interpretation=_text(metadata, _PHOTOMETRIC_INTERPRETATION),
        image_type=_text(metadata, _IMAGE_TYPE),
        completion_flag=_text(metadata, _COMPLETION_FLAG),
        verification_flag=_text(metadata, _VERIFICATION_FLAG),
        concept_name_code=concept,
        specific_character_set=charset,
    )
    return patient, study, series, instance


def _inferred_transfer_syntax(implicit: bool, little: bool) -> str:
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def parse_for_index(
    stream: BinaryIO, *, bulk_data_threshold: int, locate_fragments: bool = True
) -> ParsedInstance:
    """Read a Part 10 object once and return what the index stores.

    ``locate_fragments``: walk the item headers of encapsulated Pixel Data
    to list its fragments (and find elements after it).  That is a few
    bytes per frame read all over the object: cheap on a local file, one
    request per frame on object storage, where it is better left off.

    Raises NotDicomError when the bytes are not a readable DICOM dataset and
    InvalidInstanceError when the dataset has no SOP Instance UID or SOP
    Class UID (neither in the dataset nor in the file meta).  Anything
    else odd is kept best-effort and listed in ``warnings``.
    """
    reader: BinaryIO = stream if _seekable(stream) else cast(BinaryIO, _ForwardReader(stream))
    defer_size = max(bulk_data_threshold, _MIN_DEFER_BYTES)
    try:
        ds = dcmread(reader, defer_size=defer_size, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise NotDicomError(f"not a readable DICOM object: {type(exc).__name__}: {exc}") from exc
    if len(ds.keys()) == 0:
        raise NotDicomError("not a DICOM object: no data elements")

    implicit, little = ds.original_encoding
    implicit = bool(implicit) if implicit is not None else True
    little = bool(little) if little is not None else True
    meta = getattr(ds, "file_meta", None)
    ts_element = meta.get(0x00020010) if meta is not None else None
    transfer_syntax = _clean(str(ts_element.value)).strip() if ts_element and ts_element.value else ""
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    # A deflated dataset was inflated into a buffer of pydicom's own: values
    # are read from there, but their offsets mean nothing in the stored object.
    source: Any = reader
    if deflated and ds.buffer is not None and ds.buffer is not reader:
        source = ds.buffer
    walker = _Walker(
        cast(BinaryIO, source),
        threshold=bulk_data_threshold,
        is_little_endian=little,
        offsets_valid=not deflated,
    )
    metadata = walker.dataset(ds, "")
    # pydicom stopped at the start of Pixel Data (or at the end).
    try:
        _trailing_elements(
            cast(BinaryIO, source),
            walker,
            implicit=implicit,
            little=little,
            defer_size=defer_size,
            encoding=ds._character_set,
            out=metadata,
            locate_fragments=locate_fragments,
        )
    except Exception as exc:
        walker.warn("7FE00010", f"pixel data not located: {type(exc).__name__}: {exc}")
    metadata = dict(sorted(metadata.items()))

    patient, study, series, instance = _index_attributes(metadata)
    if meta is not None:
        if instance.sop_instance_uid is None:
            uid = meta.get(0x00020003)
            instance.sop_instance_uid = _clean(str(uid.value)).strip() or None if uid else None
        if instance.sop_class_uid is None:
            uid = meta.get(0x00020002)
            instance.sop_class_uid = _clean(str(uid.value)).strip() or None if uid else None
    if not instance.sop_instance_uid:
        raise InvalidInstanceError("the object has no SOP Instance UID")
    if not instance.sop_class_uid:
        raise InvalidInstanceError("the object has no SOP Class UID")
    return ParsedInstance(
        transfer_syntax_uid=transfer_syntax or _inferred_transfer_syntax(implicit, little),
        has_file_meta=bool(transfer_syntax),
        patient=patient,
        study=study,
        series=series,
        instance=instance,
        metadata=metadata,
        bulk_data=walker.bulk_data,
        warnings=walker.warnings,
    )
