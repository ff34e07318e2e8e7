"""Part 10 files as the DICOM JSON model (PS3.18 F.2), with bulk data inline
or in files beside the JSON, and back.

pydicom does the model (``Dataset.to_json_dict`` / ``Dataset.from_json``);
this module adds what a file needs:

* **File meta information** is kept *within* the JSON object: the group
  0002 attributes come first, as ordinary attributes (as DCMTK's
  ``dcm2json +fm`` writes them).  Reading back, group 0002 becomes the file
  meta of the written Part 10 file.  A model without group 0002 is written
  as Explicit VR Little Endian with a generated file meta.
* **Bulk data** is either inline (``InlineBinary``, base64) or, with a
  threshold, written as raw bytes to files and referenced by a
  ``BulkDataURI`` relative to the JSON (or XML) document, e.g.
  ``CT.dcm.bulk/0003-7FE00010.bin``.  Relative URIs and ``file:`` URIs are
  read back; nothing is fetched over a network.

The model is also the base of the PS3.19 XML (:mod:`pacs_common.dicom.native_xml`).
"""

from __future__ import annotations

import array
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

__all__ = [
    "INLINE",
    "BulkDataError",
    "BulkDataFiles",
    "dataset_differences",
    "dataset_to_model",
    "model_to_dataset",
    "resolve_bulk_uri",
    "write_part10",
]

#: A threshold that keeps every value inline.
INLINE: int = 2**62


class BulkDataError(Exception):
    """A ``BulkDataURI`` that cannot be resolved."""


class BulkDataFiles:
    """Writes each bulk value to ``directory`` and names it by a URI relative
    to ``base`` (the directory of the JSON/XML document)."""

    def __init__(self, directory: Path, base: Path) -> None:
        self.directory = directory
        self.base = base
        self._count = 0

    def __call__(self, element: DataElement) -> str:
        self._count += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self._count:04d}-{int(element.tag):08X}.bin"
        value = element.value
        path.write_bytes(value if isinstance(value, bytes) else bytes(value))
        return Path(os.path.relpath(path, self.base)).as_posix()


def dataset_to_model(
    dataset: Dataset,
    *,
    bulk_handler: Callable[[DataElement], str] | None = None,
    bulk_threshold: int = INLINE,
) -> dict[str, Any]:
    """The DICOM JSON model of ``dataset`` with its file meta (group 0002) first."""
    model: dict[str, Any] = {}
    meta = getattr(dataset, "file_meta", None)
    if meta:
        model.update(meta.to_json_dict(bulk_data_threshold=INLINE))
    if _is_big_endian(dataset):
        # The model's binary values are little endian (PS3.18 F.2.7); pydicom
        # copies the stored bytes, so swap a (retired) big endian file's words.
        dataset = _swapped_copy(dataset)
    model.update(
        dataset.to_json_dict(bulk_data_threshold=bulk_threshold, bulk_data_element_handler=bulk_handler)
    )
    return model


def resolve_bulk_uri(base: Path, uri: str) -> bytes:
    """The bytes of a relative or ``file:`` ``BulkDataURI``."""
    if not uri:
        raise BulkDataError("an empty BulkDataURI")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" and not parsed.netloc:
        path = base / unquote(parsed.path)
    else:
        raise BulkDataError(f"BulkDataURI {uri!r}: only relative and file: URIs are read")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BulkDataError(f"BulkDataURI {uri!r}: {exc.strerror or exc}") from exc


def model_to_dataset(model: dict[str, Any], base: Path) -> Dataset:
    """The dataset of a JSON model (bulk data URIs relative to ``base``),
    with group 0002 moved to ``file_meta``."""

    def bulk(tag: str, vr: str, uri: str) -> bytes:
        return resolve_bulk_uri(base, uri)

    meta_model = {key: value for key, value in model.items() if key.upper().startswith("0002")}
    body_model = {key: value for key, value in model.items() if not key.upper().startswith("0002")}
    dataset = Dataset.from_json(body_model, bulk_data_uri_handler=bulk)
    meta = FileMetaDataset()
    for element in Dataset.from_json(meta_model, bulk_data_uri_handler=bulk):
        meta.add(element)
    dataset.file_meta = meta
    if _is_big_endian(dataset):
        dataset = _swapped_copy(dataset)
    return dataset


#: Byte size of the words of binary VRs whose byte order depends on the transfer syntax.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_CODES = {
    size: next(code for code in "HILQ" if array.array(code).itemsize == size) for size in (2, 4, 8)
}


def _swap_words(value: bytes, size: int) -> bytes:
    whole = len(value) - len(value) % size
    words = array.array(_ARRAY_CODES[size], value[:whole])
    words.byteswap()
    return words.tobytes() + value[whole:]


def _is_big_endian(dataset: Dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta else None
    return bool(syntax) and not UID(str(syntax)).is_little_endian


def _swapped_copy(dataset: Dataset) -> Dataset:
    """A copy of ``dataset`` with the words of its OW/OF/OL/OD/OV values
    byte-swapped (recursively), between big and little endian."""
    copy = Dataset()
    for element in dataset:
        value = element.value
        if element.VR == "SQ":
            value = [_swapped_copy(item) for item in value]
        elif element.VR in _WORD_SIZE and isinstance(value, bytes) and value:
            value = _swap_words(value, _WORD_SIZE[element.VR])
        copy.add(DataElement(element.tag, element.VR, value))
    if hasattr(dataset, "file_meta"):
        copy.file_meta = dataset.file_meta
    return copy


def write_part10(dataset: Dataset, path: Path) -> None:
    """Write ``dataset`` (with the file meta the model had) as a Part 10 file.

    The file meta is written as given; without a Transfer Syntax UID the
    dataset is encoded as Explicit VR Little Endian (and the file meta left
    as it was, so a round trip keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.preamble = bytes(128)  # so a reader finds the "DICM" prefix
    meta = dataset.file_meta
    if "TransferSyntaxUID" in meta:
        if UID(meta.TransferSyntaxUID).is_implicit_VR:
            _mark_private_sequences(dataset)
        dataset.save_as(path, enforce_file_format=False)
    elif len(meta) == 0:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)


def _mark_private_sequences(dataset: Dataset) -> None:
    """In Implicit VR a reader tells a private sequence (whose VR no
    dictionary knows) by its undefined length: write them so."""
    for element in dataset:
        if element.VR == "SQ":
            if element.tag.is_private:
                element.is_undefined_length = True
            for item in element.value:
                _mark_private_sequences(item)


def dataset_differences(original: Dataset, copy: Dataset, where: str = "") -> list[str]:
    """What a copy (e.g. after a JSON or XML round trip) lost or changed,
    element by element: tag, VR and value, recursing into sequence items.

    Group Length elements (gggg,0000) other than (0002,0000) are left out:
    they are retired (PS3.5 7.2) and pydicom never writes them."""
    found: list[str] = []

    def kept(dataset: Dataset) -> set[int]:
        return {int(e.tag) for e in dataset if e.tag.element != 0 or e.tag.group == 0x0002}

    left, right = kept(original), kept(copy)
    found += [f"{where}({t:08X}) missing" for t in sorted(left - right)]
    found += [f"{where}({t:08X}) added" for t in sorted(right - left)]
    for tag in sorted(left & right):
        a, b = original[tag], copy[tag]
        if a.VR != b.VR:
            found.append(f"{where}({tag:08X}) VR {a.VR} != {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{where}({tag:08X}) {len(a.value)} items != {len(b.value)}")
                continue
            for i, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                found += dataset_differences(x, y, f"{where}({tag:08X})[{i}].")
        elif a.value != b.value:
            found.append(f"{where}({tag:08X}) {a.value!r:.60} != {b.value!r:.60}")
    return found
