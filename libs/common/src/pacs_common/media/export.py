"""Export of stored studies as a DICOM File-set (PS3.10, PS3.11 General
Purpose profile): a DICOMDIR with PATIENT / STUDY / SERIES / IMAGE records
and every instance under a conformant File ID.

pydicom's :class:`~pydicom.fileset.FileSet` builds the directory records and
the File IDs (``PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx``: components of at most
8 characters of A-Z, 0-9 and ``_``).  Each instance is streamed from the
tier the index names to a spool file, optionally de-identified (PS3.15
Annex E, :mod:`pacs_common.dicom.deidentify`, one salt so UIDs and references
stay consistent inside the set) and optionally transcoded to Explicit VR
Little Endian; only its header (without pixel data) is handed to the
FileSet, and once the FileSet has written the DICOMDIR the prepared file is
moved to its File ID.  So an instance that is neither de-identified nor
transcoded is exported byte for byte as stored, and at most one instance is
in memory (when it is transformed).

Directory records need some Type 1 values an instance may lack (an empty
Study ID is common, and de-identification empties it): those are invented
in the record only, as ``dcmmkdir --invent`` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import asyncpg
import pydicom
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

from pacs_common.dicom.deidentify import Deidentifier
from pacs_common.dicom.signature_settings import Signer
from pacs_common.dicom.signatures import SignatureError
from pacs_common.dicom.transcode import TranscodeError, transcode_file
from pacs_common.storage import ObjectArchivedError, ObjectNotFoundError, StorageError, StorageRegistry

__all__ = [
    "FILE_SET_ID",
    "ExportCancelledError",
    "ExportFailure",
    "ExportOptions",
    "ExportResult",
    "ExportSource",
    "FileSetExporter",
    "MissingStudiesError",
    "find_export_sources",
]

logger = logging.getLogger(__name__)

#: File-set ID (CS, at most 16 characters) written into the DICOMDIR.
FILE_SET_ID: Final = "PACS_EXPORT"
DICOMDIR: Final = "DICOMDIR"
_ONLINE: Final = "ONLINE"
_STUDY_ID_LENGTH: Final = 16

_SOURCES_SQL: Final = """
SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.availability, l.tier, l.key
  FROM instance AS i
  JOIN series AS se ON se.pk = i.series_fk
  JOIN study AS st ON st.pk = se.study_fk
  JOIN instance_location AS l ON l.instance_fk = i.pk
 WHERE st.study_instance_uid = ANY($1::text[])
 ORDER BY st.study_instance_uid, se.series_instance_uid, i.instance_number NULLS LAST, i.sop_instance_uid
"""


class ExportOptions(BaseModel):
    """What the exported set looks like."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The profile and its options are the Deidentifier's (given to the exporter with the salt).
    deidentify: bool = Field(default=False, description="de-identify (PS3.15 Annex E basic profile)")
    explicit_vr_little_endian: bool = Field(
        default=False, description="transcode every instance to Explicit VR Little Endian"
    )
    sign: bool = Field(
        default=False, description="add a digital signature (PS3.15 Annex C) with the configured key"
    )


@dataclass(frozen=True, slots=True)
class ExportSource:
    """One stored instance: where the index says it is."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    tier: str
    key: str
    availability: str = _ONLINE


@dataclass(frozen=True, slots=True)
class ExportFailure:
    sop_instance_uid: str
    reason: str


@dataclass(slots=True)
class ExportResult:
    directory: Path
    # SOP Instance UID (as exported: the new one when de-identified) → File ID ("A/B/C").
    file_ids: dict[str, str] = field(default_factory=dict)
    failures: list[ExportFailure] = field(default_factory=list)

    @property
    def instances_written(self) -> int:
        return len(self.file_ids)


class MissingStudiesError(LookupError):
    """Some requested studies are not in the index."""

    def __init__(self, study_uids: Sequence[str]) -> None:
        self.study_uids = list(study_uids)
        super().__init__(f"not in the archive: {', '.join(self.study_uids)}")


class ExportCancelledError(Exception):
    """The progress callback asked to stop (the job was cancelled)."""


async def find_export_sources(
    db: asyncpg.Pool | asyncpg.Connection, study_uids: Sequence[str]
) -> list[ExportSource]:
    """Every instance of the studies, in study / series / instance order.
    Raises :class:`MissingStudiesError` when a study has no instance."""
    wanted = list(dict.fromkeys(study_uids))
    rows = await db.fetch(_SOURCES_SQL, wanted)
    sources = [
        ExportSource(
            study_instance_uid=r["study_instance_uid"],
            series_instance_uid=r["series_instance_uid"],
            sop_instance_uid=r["sop_instance_uid"],
            tier=r["tier"],
            key=r["key"],
            availability=r["availability"] or _ONLINE,
        )
        for r in rows
    ]
    found = {s.study_instance_uid for s in sources}
    missing = [uid for uid in wanted if uid not in found]
    if missing:
        raise MissingStudiesError(missing)
    return sources


# Progress: (instances done, total) → False to stop.
Progress = Callable[[int, int], bool]


class _InstanceError(Exception):
    """One instance could not be exported; the others go on."""


class FileSetExporter:
    """Writes File-sets from stored instances (blocking: run it in a thread)."""

    def __init__(
        self,
        storage: StorageRegistry,
        options: ExportOptions | None = None,
        *,
        deidentifier: Deidentifier | None = None,
        signer: Signer | None = None,
    ) -> None:
        self._storage = storage
        self.options = options or ExportOptions()
        if self.options.deidentify and deidentifier is None:
            raise ValueError("de-identified export needs a Deidentifier (with the deployment's salt)")
        if self.options.sign and signer is None:
            raise ValueError("signed export needs a Signer (the deployment's key and certificate)")
        self._deidentifier = deidentifier if self.options.deidentify else None
        self._signer = signer if self.options.sign else None

    def export(
        self, sources: Sequence[ExportSource], target: Path, progress: Progress | None = None
    ) -> ExportResult:
        """Write the File-set of ``sources`` into ``target`` (created; it must
        not hold a DICOMDIR yet).  Instances that cannot be exported are
        listed in the result's failures; the set holds the others."""
        target.mkdir(parents=True, exist_ok=True)
        if (target / DICOMDIR).exists():
            raise FileExistsError(f"{target} already holds a DICOMDIR")
        result = ExportResult(directory=target)
        # On the target's file system, so that prepared files are moved, not copied.
        spool = Path(tempfile.mkdtemp(prefix=".export-", dir=target))
        try:
            file_set = FileSet()
            file_set.ID = FILE_SET_ID
            prepared: dict[str, Path] = {}
            seen: set[str] = set()
            for number, source in enumerate(sources):
                if source.sop_instance_uid not in seen:  # listed twice: one copy in the set
                    seen.add(source.sop_instance_uid)
                    self._add(file_set, source, spool, number, prepared=prepared, result=result)
                if progress is not None and not progress(number + 1, len(sources)):
                    raise ExportCancelledError("export cancelled")
            if prepared:
                file_set.write(target)
                for instance in file_set:
                    destination = target / instance.FileID
                    os.replace(prepared[instance.SOPInstanceUID], destination)
                    result.file_ids[instance.SOPInstanceUID] = "/".join(Path(instance.FileID).parts)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        return result

    def _add(
        self,
        file_set: FileSet,
        source: ExportSource,
        spool: Path,
        number: int,
        *,
        prepared: dict[str, Path],
        result: ExportResult,
    ) -> None:
        """Prepare one instance and add its records; a failure is noted in ``result``."""
        try:
            path, header = self._prepare(source, spool, number)
            try:
                file_set.add(_record_view(header, number))
            except (ValueError, KeyError) as exc:
                raise _InstanceError(f"no directory record for it: {exc}") from exc
            prepared[str(header.SOPInstanceUID)] = path
        except _InstanceError as exc:
            result.failures.append(ExportFailure(source.sop_instance_uid, str(exc)))

    def _prepare(self, source: ExportSource, spool: Path, number: int) -> tuple[Path, Dataset]:
        """The instance as it goes into the set (a spool file) and its header."""
        if source.availability != _ONLINE:
            raise _InstanceError(f"the instance is {source.availability.lower()}: restore it first")
        original = spool / f"{number}.dcm"
        self._fetch(source, original)
        path = original
        try:
            if self._deidentifier is not None:
                dataset = pydicom.dcmread(path)
                deidentified = self._deidentifier.deidentify(dataset)
                path = spool / f"{number}.deid.dcm"
                deidentified.save_as(path, enforce_file_format=True)
                original.unlink()
            if self.options.explicit_vr_little_endian:
                syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
                if syntax != ExplicitVRLittleEndian:
                    converted = spool / f"{number}.evrle.dcm"
                    transcode_file(path, converted, ExplicitVRLittleEndian)
                    path.unlink()
                    path = converted
            if self._signer is not None:
                # Last: the signature covers the bytes as they go into the set.
                dataset = pydicom.dcmread(path)
                self._signer.sign(dataset)
                signed = spool / f"{number}.signed.dcm"
                dataset.save_as(signed, enforce_file_format=True)
                path.unlink()
                path = signed
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except TranscodeError as exc:
            raise _InstanceError(f"cannot transcode to Explicit VR Little Endian: {exc}") from exc
        except SignatureError as exc:
            raise _InstanceError(f"cannot sign: {exc}") from exc
        except (InvalidDicomError, ValueError, KeyError, AttributeError, EOFError) as exc:
            raise _InstanceError(f"not a readable DICOM object: {exc}") from exc
        return path, header

    def _fetch(self, source: ExportSource, target: Path) -> None:
        try:
            storage = self._storage.get(source.tier)
        except KeyError as exc:
            raise _InstanceError(f"storage tier {source.tier} is not configured") from exc
        try:
            with storage.open(source.key) as stream, target.open("wb") as out:
                shutil.copyfileobj(stream, out, 1024 * 1024)
        except ObjectArchivedError as exc:
            raise _InstanceError("the object is archived and must be restored first") from exc
        except ObjectNotFoundError as exc:
            raise _InstanceError("the stored object is missing") from exc
        except StorageError as exc:
            logger.error("export: storage failed: %s", exc)
            raise _InstanceError("storage unavailable") from exc


def _empty(dataset: Dataset, keyword: str) -> bool:
    return keyword not in dataset or dataset[keyword].VM == 0


def _record_view(header: Dataset, number: int) -> Dataset:
    """``header`` with the Type 1 values of the directory records it lacks
    invented (the file itself keeps what it has)."""
    study = str(header.get("StudyInstanceUID", ""))
    invented: dict[str, object] = {
        "PatientID": "UNKNOWN",
        "StudyDate": "19000101",
        "StudyTime": "000000",
        "StudyID": "S" + hashlib.sha256(study.encode()).hexdigest()[: _STUDY_ID_LENGTH - 1].upper(),
        "Modality": "OT",
        "SeriesNumber": 0,
        "InstanceNumber": number + 1,
    }
    missing = {k: v for k, v in invented.items() if _empty(header, k)}
    for keyword, value in missing.items():
        setattr(header, keyword, value)
    return header
