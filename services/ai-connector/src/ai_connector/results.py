"""Checking the objects an inference service returned and storing them
through the normal ingest path (hot tier + ingest message, like C-STORE and
STOW-RS), so the ingest worker indexes them like any instance."""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from ai_connector.multipart import DICOM_MEDIA_TYPE, MultipartError, Part, parse_multipart
from pacs_common.messaging.models import IngestMessage, IngestSource
from pacs_common.receiving import InstanceReceiver

__all__ = ["InvalidResultError", "ResultObject", "ResultStorer", "check_results", "parse_results"]

_PREAMBLE_LENGTH: Final = 128
_ACCEPTED_PART_TYPES: Final = frozenset({DICOM_MEDIA_TYPE, "application/octet-stream", ""})


class InvalidResultError(ValueError):
    """What the inference service returned cannot be stored (a permanent failure)."""


@dataclass(frozen=True)
class ResultObject:
    """One checked result: a Part 10 object of the source study."""

    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


def parse_results(content_type: str, body: bytes) -> list[Part]:
    try:
        parts = parse_multipart(content_type, body)
    except MultipartError as exc:
        raise InvalidResultError(f"not a multipart/related answer: {exc}") from exc
    for index, part in enumerate(parts, 1):
        if part.content_type not in _ACCEPTED_PART_TYPES:
            raise InvalidResultError(f"part {index} is {part.content_type!r}, not {DICOM_MEDIA_TYPE}")
    return parts


def _as_part10(data: bytes, dataset: Dataset) -> bytes:
    """``data`` when it is a Part 10 file already; else the dataset with a file meta."""
    if data[_PREAMBLE_LENGTH : _PREAMBLE_LENGTH + 4] == b"DICM":
        return data
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def check_results(contents: Sequence[bytes], study_instance_uid: str) -> list[ResultObject]:
    """Every object must be DICOM with the SOP identity and the source study's
    Study Instance UID; one that is not refuses the whole answer."""
    checked: list[ResultObject] = []
    for index, data in enumerate(contents, 1):
        try:
            dataset = dcmread(io.BytesIO(data), force=True)
            sop_class = str(dataset.SOPClassUID)
            sop_instance = str(dataset.SOPInstanceUID)
            study = str(dataset.StudyInstanceUID)
            str(dataset.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, KeyError, ValueError, EOFError, TypeError) as exc:
            raise InvalidResultError(f"result {index} is not a DICOM object with its UIDs: {exc}") from exc
        if study != study_instance_uid:
            raise InvalidResultError(
                f"result {index} ({sop_instance}) belongs to study {study}, not to the source study "
                f"{study_instance_uid}: refused"
            )
        checked.append(ResultObject(sop_class, sop_instance, _as_part10(data, dataset)))
    return checked


class ResultStorer:
    """Stores checked results with an :class:`InstanceReceiver`.

    ``publish`` blocks until the broker confirmed (it is called from a worker
    thread); the receiver writes to the hot tier first.
    """

    def __init__(self, receiver: InstanceReceiver, spool_dir: Path) -> None:
        self._receiver = receiver
        self._spool_dir = spool_dir

    def _store_all(self, results: Sequence[ResultObject], source: IngestSource) -> list[IngestMessage]:
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        messages: list[IngestMessage] = []
        for result in results:
            with tempfile.NamedTemporaryFile(dir=self._spool_dir, suffix=".dcm") as spooled:
                spooled.write(result.data)
                spooled.flush()
                received = self._receiver.receive(
                    Path(spooled.name),
                    source,
                    announced_sop_class_uid=result.sop_class_uid,
                    announced_sop_instance_uid=result.sop_instance_uid,
                )
            messages.append(received.message)
        return messages

    async def store(self, results: Sequence[ResultObject], source: IngestSource) -> list[IngestMessage]:
        """Write and queue every result (in a thread: storage is blocking)."""
        return await asyncio.to_thread(self._store_all, list(results), source)
