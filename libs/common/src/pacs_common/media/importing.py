"""Import of DICOM media: a File-set with a DICOMDIR, a plain folder, a zip.

Every DICOM file goes through the :class:`~pacs_common.receiving.InstanceReceiver`
that C-STORE and STOW-RS use (write-once to the hot tier, ingest message with
publisher confirms), one at a time; the ingest worker indexes it like any
other.  Nothing that is wrong with one file stops the others: each file gets
a line in the report:

- ``stored``: stored and queued for indexing;
- ``not_dicom``: not a DICOM Part 10 file (a viewer on a CD, a README...);
- ``broken_record``: the DICOMDIR names a file that is not there, or the
  DICOMDIR itself cannot be read (the folder is then imported as a plain one);
- ``refused``: a DICOM file that cannot be stored (truncated or damaged, no
  identity, or storage / broker failures), with the reason.

A folder with a ``DICOMDIR`` is read with pydicom's
:class:`~pydicom.fileset.FileSet` and only the files its records reference
are imported.  A zip is extracted entry by entry (names made safe by
:mod:`zipfile`) into a spool folder and imported as a folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Final

import pydicom
from cryptography import x509
from pydantic import BaseModel, Field
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet
from pydicom.uid import MediaStorageDirectoryStorage

from pacs_common.dicom.received import InvalidDatasetError
from pacs_common.dicom.signatures import verify
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import IngestSource
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import StorageError

__all__ = [
    "DEFAULT_MAX_ZIP_BYTES",
    "ImportReport",
    "ImportStatus",
    "ImportedFile",
    "MediaImporter",
]

logger = logging.getLogger(__name__)

DICOMDIR: Final = "DICOMDIR"
#: Refuse zips whose content (uncompressed) is larger than this (zip bombs).
DEFAULT_MAX_ZIP_BYTES: Final = 64 * 1024**3
_PREAMBLE: Final = 128
_MAGIC: Final = b"DICM"


class ImportStatus(StrEnum):
    STORED = "stored"
    NOT_DICOM = "not_dicom"
    BROKEN_RECORD = "broken_record"
    REFUSED = "refused"


class ImportedFile(BaseModel):
    """What became of one file (or one record of a DICOMDIR)."""

    path: str
    status: ImportStatus
    reason: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    # One status per digital signature the file carries ("valid", "invalid",
    # "untrusted-certificate", "expired"); empty when it carries none.
    signatures: list[str] = Field(default_factory=list)


class ImportReport(BaseModel):
    files: list[ImportedFile] = Field(default_factory=list)

    def count(self, status: ImportStatus) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def stored(self) -> int:
        return self.count(ImportStatus.STORED)

    @property
    def failed(self) -> int:
        return len(self.files) - self.stored

    def summary(self) -> dict[str, int]:
        return {status.value: self.count(status) for status in ImportStatus}

    def add(
        self,
        path: str,
        status: ImportStatus,
        reason: str | None = None,
        *,
        signatures: Sequence[str] = (),
        **uids: str | None,
    ) -> None:
        self.files.append(
            ImportedFile(path=path, status=status, reason=reason, signatures=list(signatures), **uids)
        )


def _is_part10(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(_PREAMBLE + len(_MAGIC))
    return head[_PREAMBLE:] == _MAGIC


class _DamagedError(Exception):
    """A DICOM file that is cut short or otherwise unreadable."""


_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
# Values larger than this are not read, only their extent checked.
_DEFER_BYTES: Final = 4096


def _read_checked(path: Path) -> Dataset:
    """The object's dataset (large values not read), checked to be complete:
    pydicom stops silently at the end of a file cut short, so the last
    element must end where the file ends, and an encapsulated value must
    reach its delimiter."""
    size = path.stat().st_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    for warning in caught:
        text = str(warning.message)
        if "End of file" in text or "truncat" in text.lower():
            raise _DamagedError(text)
    tags = list(dataset.keys())
    if not tags:
        raise _DamagedError("the file holds no dataset")
    last = dataset.get_item(max(tags))
    tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if tell is not None and length is not None and length != _UNDEFINED_LENGTH and tell + length != size:
        raise _DamagedError(f"truncated: element {last.tag} needs {tell + length} bytes, the file has {size}")
    return dataset


class MediaImporter:
    """Imports files, folders, File-sets and zips (blocking: run it in a thread)."""

    def __init__(
        self,
        receiver: InstanceReceiver,
        source: IngestSource,
        *,
        spool_dir: Path | None = None,
        max_zip_bytes: int = DEFAULT_MAX_ZIP_BYTES,
        trust_anchors: Sequence[x509.Certificate] | None = None,
    ) -> None:
        """``trust_anchors``: the certificates signatures are verified
        against (None: only the MAC and the validity dates are checked)."""
        self._receiver = receiver
        self._source = source
        self._spool_dir = spool_dir
        self._max_zip_bytes = max_zip_bytes
        self._trust_anchors = trust_anchors

    def import_paths(self, paths: Sequence[Path]) -> ImportReport:
        report = ImportReport()
        for path in paths:
            self.import_path(path, report, label=str(path))
        return report

    def import_path(self, path: Path, report: ImportReport, *, label: str) -> None:
        if path.is_dir():
            self._directory(path, report, label)
        elif path.is_file() and path.name.upper() == DICOMDIR:
            self._file_set(path.parent, report, str(Path(label).parent))
        elif path.is_file() and zipfile.is_zipfile(path):
            self._zip(path, report, label)
        elif path.is_file():
            self._file(path, report, label)
        else:
            report.add(label, ImportStatus.REFUSED, "no such file or directory")

    # -- containers --------------------------------------------------------------

    def _directory(self, directory: Path, report: ImportReport, label: str) -> None:
        dicomdir = next((p for p in directory.iterdir() if p.name.upper() == DICOMDIR and p.is_file()), None)
        if dicomdir is not None:
            self._file_set(directory, report, label, dicomdir)
            return
        for child in sorted(directory.iterdir()):
            if child.is_symlink() and child.is_dir():
                continue  # never followed: a link to a parent would never end
            self.import_path(child, report, label=_join(label, child.name))

    def _file_set(self, root: Path, report: ImportReport, label: str, dicomdir: Path | None = None) -> None:
        dicomdir = dicomdir or root / DICOMDIR
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # missing files: reported below, record by record
                directory = pydicom.dcmread(dicomdir)
                if directory.file_meta.get("MediaStorageSOPClassUID") != MediaStorageDirectoryStorage:
                    raise ValueError("not a Media Storage Directory object")
                file_set = FileSet(directory)
        except Exception as exc:
            report.add(
                _join(label, dicomdir.name),
                ImportStatus.BROKEN_RECORD,
                f"unreadable DICOMDIR ({exc}); the folder is imported without it",
            )
            for child in sorted(root.iterdir()):
                if child != dicomdir:
                    self.import_path(child, report, label=_join(label, child.name))
            return
        found: set[Path] = set()
        for instance in file_set:
            path = Path(instance.path)
            found.add(path.resolve())
            self._file(path, report, _join(label, path.relative_to(root).as_posix()))
        for file_id, sop in _referenced_files(directory):
            path = root.joinpath(*file_id)
            if not path.is_file() or path.resolve() not in found:
                report.add(
                    _join(label, "/".join(file_id)),
                    ImportStatus.BROKEN_RECORD,
                    "the DICOMDIR references a file that is not there",
                    sop_instance_uid=sop,
                )

    def _zip(self, path: Path, report: ImportReport, label: str) -> None:
        try:
            with zipfile.ZipFile(path) as archive:
                entries = [i for i in archive.infolist() if not i.is_dir()]
                size = sum(i.file_size for i in entries)
                if size > self._max_zip_bytes:
                    report.add(
                        label,
                        ImportStatus.REFUSED,
                        f"the zip holds {size} bytes uncompressed, more than {self._max_zip_bytes}",
                    )
                    return
                with self._extraction_dir() as spool:
                    for entry in entries:
                        try:
                            _extract(archive, entry, spool)
                        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                            report.add(
                                f"{label}:{entry.filename}", ImportStatus.REFUSED, f"damaged entry: {exc}"
                            )
                    self._directory(spool, report, label + ":")
        except zipfile.BadZipFile as exc:
            report.add(label, ImportStatus.REFUSED, f"damaged zip: {exc}")

    def _extraction_dir(self) -> _TemporaryDirectory:
        if self._spool_dir is not None:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
        return _TemporaryDirectory(Path(tempfile.mkdtemp(prefix="import-", dir=self._spool_dir)))

    # -- one file ----------------------------------------------------------------

    def _file(self, path: Path, report: ImportReport, label: str) -> None:
        try:
            if not _is_part10(path):
                report.add(label, ImportStatus.NOT_DICOM, "not a DICOM Part 10 file")
                return
            dataset = _read_checked(path)
        except OSError as exc:
            report.add(label, ImportStatus.REFUSED, f"unreadable: {exc.strerror or exc}")
            return
        except (
            _DamagedError,
            InvalidDicomError,
            ValueError,
            EOFError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            report.add(label, ImportStatus.REFUSED, f"damaged or truncated DICOM file: {exc}")
            return
        uids = {
            "sop_instance_uid": str(dataset.get("SOPInstanceUID", "")) or None,
            "study_instance_uid": str(dataset.get("StudyInstanceUID", "")) or None,
        }
        if dataset.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            report.add(label, ImportStatus.REFUSED, "a DICOMDIR outside the root of its File-set")
            return
        signatures = (
            [str(r.status) for r in verify(dataset, trust_anchors=self._trust_anchors)]
            if "DigitalSignaturesSequence" in dataset
            else []
        )
        del dataset
        try:
            self._receiver.receive(path, self._source)
        except InvalidDatasetError as exc:
            report.add(label, ImportStatus.REFUSED, str(exc), signatures=signatures, **uids)
        except StorageError as exc:
            logger.error("import: storage failed: %s", exc)
            report.add(label, ImportStatus.REFUSED, "storage unavailable", signatures=signatures, **uids)
        except PublishError as exc:
            logger.error("import: publishing the ingest message failed: %s", exc)
            report.add(label, ImportStatus.REFUSED, "ingest queue unavailable", signatures=signatures, **uids)
        else:
            report.add(label, ImportStatus.STORED, signatures=signatures, **uids)


def _extract(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, root: Path) -> None:
    """One entry, streamed, under ``root`` (names that would leave it are
    cut to their safe parts); nothing is left of an entry that fails."""
    parts = [p for p in PurePosixPath(entry.filename.replace("\\", "/")).parts if p not in ("/", ".", "..")]
    if not parts:
        raise ValueError(f"no usable name: {entry.filename!r}")
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"a name outside the archive: {entry.filename!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(entry) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _join(label: str, name: str) -> str:
    """``folder/name``, or ``upload.zip:name`` inside a zip."""
    return f"{label}{name}" if label.endswith(":") else f"{label}/{name}"


def _referenced_files(directory: Dataset) -> Iterator[tuple[list[str], str | None]]:
    """(File ID components, SOP Instance UID) of every record that references a file."""
    for record in directory.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = [str(file_id)] if isinstance(file_id, str) else [str(p) for p in file_id]
        sop = record.get("ReferencedSOPInstanceUIDInFile")
        yield parts, str(sop) if sop else None


class _TemporaryDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *_: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
