"""Checks on a dataset as it arrives, before the archive accepts it.

A receiver (C-STORE, STOW-RS) must not acknowledge what it cannot keep: a
dataset cut short, one that is not DICOM at all, or one whose identity
differs from what the sender announced.  ``read_identity`` walks the
top-level elements once with pydicom's element generator — values above a
small size are skipped, never loaded — and checks that every element lies
inside the received bytes, so the cost is a header parse even for a 1 GB
multi-frame object.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.filereader import data_element_generator
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_IDENTITY_TAGS = frozenset({_SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID})
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Values longer than this are skipped with a seek instead of read.
_SKIP_VALUES_LONGER_THAN = 256
_MAX_UID_LENGTH = 64
_DEFLATE_TRAILER_ALLOWANCE = 8


class InvalidDatasetError(ValueError):
    """The received bytes are not a complete, consistent DICOM dataset."""


class MissingIdentityError(InvalidDatasetError):
    """A well-formed dataset without the UIDs that place it in the
    patient/study/series/instance hierarchy (Type 1 in every IOD)."""


@dataclass(frozen=True)
class DatasetIdentity:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def _uid_value(raw: bytes | None, tag: int) -> str:
    value = (raw or b"").rstrip(b"\x00 ").decode("ascii", errors="replace")
    if not value:
        raise MissingIdentityError(
            f"required attribute ({tag >> 16:04X},{tag & 0xFFFF:04X}) is missing or empty"
        )
    if len(value) > _MAX_UID_LENGTH or not all(c.isdigit() or c == "." for c in value):
        raise InvalidDatasetError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a valid UID: {value[:80]!r}")
    return value


def read_identity(stream: BinaryIO, transfer_syntax: str, size: int) -> DatasetIdentity:
    """Validate the dataset encoded in the next ``size`` bytes of ``stream``
    (no file meta) and return its identifying UIDs.

    Raises InvalidDatasetError when the dataset is truncated, has trailing
    garbage, cannot be parsed in ``transfer_syntax`` or lacks an identifying UID.
    """
    syntax = UID(transfer_syntax)
    if syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(stream.read(size)) + inflater.flush()
        except zlib.error as exc:
            raise InvalidDatasetError(f"deflated dataset does not inflate: {exc}") from exc
        # A deflate stream knows where it ends; a pad byte or a writer's
        # checksum trailer (some append zlib/gzip trailers) may follow it.
        if not inflater.eof:
            raise InvalidDatasetError("deflated dataset truncated: the deflate stream does not end")
        if len(inflater.unused_data) > _DEFLATE_TRAILER_ALLOWANCE:
            raise InvalidDatasetError(f"{len(inflater.unused_data)} bytes follow the deflated dataset")
        stream, size = io.BytesIO(inflated), len(inflated)
    elif not syntax.is_transfer_syntax:
        raise InvalidDatasetError(f"unknown transfer syntax {transfer_syntax}")

    start = stream.tell()
    end = start
    values: dict[int, bytes | None] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            elements = data_element_generator(
                stream,
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                defer_size=_SKIP_VALUES_LONGER_THAN,
            )
            for element in elements:
                if element.tag in _IDENTITY_TAGS:
                    values[element.tag] = element.value
                # Sequences come back parsed (no declared length to check).
                declared = getattr(element, "length", _UNDEFINED_LENGTH)
                if (
                    declared != _UNDEFINED_LENGTH
                    and element.value is not None
                    and len(element.value) < declared
                ):
                    raise InvalidDatasetError(
                        f"dataset truncated inside element {element.tag} ({len(element.value)} of {declared} bytes)"
                    )
                end = stream.tell()
                if end - start > size:
                    raise InvalidDatasetError(
                        f"dataset truncated: element {element.tag} ends {end - start - size} bytes past the data"
                    )
        except InvalidDatasetError:
            raise
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InvalidDatasetError(f"dataset cannot be parsed: {exc}") from exc
    for warning in caught:
        text = str(warning.message)
        if "End of file" in text or "delimiter" in text:
            raise InvalidDatasetError(f"dataset truncated: {text}")
    if end - start != size:
        raise InvalidDatasetError(
            f"dataset has {size - (end - start)} trailing bytes that are not a DICOM element"
        )
    return DatasetIdentity(
        sop_class_uid=_uid_value(values.get(_SOP_CLASS_UID), _SOP_CLASS_UID),
        sop_instance_uid=_uid_value(values.get(_SOP_INSTANCE_UID), _SOP_INSTANCE_UID),
        study_instance_uid=_uid_value(values.get(_STUDY_INSTANCE_UID), _STUDY_INSTANCE_UID),
        series_instance_uid=_uid_value(values.get(_SERIES_INSTANCE_UID), _SERIES_INSTANCE_UID),
    )
