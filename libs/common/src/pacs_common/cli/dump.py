"""``pacs dump FILE|DIR...``: the elements of DICOM files, like DCMTK's dcmdump.

One line per element: tag, VR, keyword and the value (long values cut
short), file meta first, sequence items indented; then a summary of the
pixel data (rows, columns, frames, bits, photometric interpretation,
transfer syntax, compressed or not) unless ``--no-pixel-info``.
``--json`` prints one JSON object per file and line instead (JSON Lines):
``{"path", "status", "dataset"}`` with the PS3.18 JSON model (file meta
included; binary values over 1 KiB replaced by a ``BulkDataURI`` naming the
file and tag) and ``"pixels"``, or ``{"path", "status": "ERROR", "error"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_common.cli.files import (
    FileError,
    FileReport,
    InputFile,
    add_inputs_argument,
    input_files,
    read_dicom,
    run_per_file,
)
from pacs_common.dicom.json_files import dataset_to_model

MAX_VALUE_CHARS = 64
JSON_BULK_THRESHOLD = 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "dump",
        help="print the elements of DICOM files (like dcmdump), with pixel info",
        description="Print the file meta and dataset of DICOM files, one line per element, "
        "sequences indented, and a summary of the pixel data.",
    )
    add_inputs_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per file (PS3.18 JSON model + pixel info)"
    )
    parser.add_argument("--no-pixel-info", action="store_true", help="leave out the pixel data summary")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    out: TextIO = sys.stdout
    report = FileReport("dump", json_output=args.json)

    def process(item: InputFile) -> str:
        dataset = read_dicom(item.path)
        if args.json:
            print(json.dumps(_json_entry(item.path, dataset, not args.no_pixel_info)), file=out, flush=True)
            return ""
        lines = dump_lines(dataset)
        if not args.no_pixel_info:
            lines += ["", *(f"# {line}" for line in pixel_info_lines(dataset))]
        print(f"# {item.path}", file=out)
        print("\n".join(lines), file=out, flush=True)
        return ""

    def errors_as_json(item: InputFile) -> str:
        try:
            return process(item)
        except FileError as exc:
            if not args.json:
                raise
            print(json.dumps({"path": str(item.path), "status": "ERROR", "error": str(exc)}), file=out)
            raise

    run_per_file(report, input_files(args.inputs, on_missing=report.missing), errors_as_json)
    if args.json:
        return 1 if report.failed else 0
    return report.finish()


def dump_lines(dataset: Dataset) -> list[str]:
    """The dcmdump-like lines of a dataset with its file meta."""
    lines: list[str] = []
    meta = getattr(dataset, "file_meta", None)
    if meta:
        lines.append("# File Meta Information")
        _element_lines(meta, 0, lines)
        lines.append("# Dataset")
    _element_lines(dataset, 0, lines)
    return lines


def _element_lines(dataset: Dataset, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except Exception as exc:  # a value pydicom cannot convert: say so, go on
            lines.append(f"{indent}({tag.group:04X},{tag.element:04X}) ?? <cannot decode: {exc}>")
            continue
        name = element.keyword or element.name
        head = f"{indent}({element.tag.group:04X},{element.tag.element:04X}) {element.VR}"
        if element.VR == "SQ":
            lines.append(f"{head} {name}  ({len(element.value)} item(s))")
            for number, item in enumerate(element.value, start=1):
                lines.append(f"{indent}  Item {number}")
                _element_lines(item, depth + 2, lines)
            continue
        lines.append(f"{head} {name}  {_value_text(element)}")


def _value_text(element: DataElement) -> str:
    try:
        value = element.value
    except Exception as exc:  # an undecodable value: say so, keep dumping
        return f"<cannot decode: {exc}>"
    if value is None or (isinstance(value, str | bytes) and not value):
        return "(no value)"
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if element.VR == "UI" and isinstance(value, str):
        name = UID(value).name
        text = value if name == value else f"{value}  ({name})"
    else:
        text = element.repval
    return text if len(text) <= MAX_VALUE_CHARS else f"{text[: MAX_VALUE_CHARS - 3]}..."


def pixel_info(dataset: Dataset) -> dict[str, Any] | None:
    """A summary of the pixel data, or None when there is none."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None:
        return None
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta else None
    uid = UID(str(syntax)) if syntax else None
    frames = _get(dataset, "NumberOfFrames")
    return {
        "element": keyword,
        "rows": _get(dataset, "Rows"),
        "columns": _get(dataset, "Columns"),
        "frames": 1 if frames in (None, "") else frames,
        "samples_per_pixel": _get(dataset, "SamplesPerPixel"),
        "bits_allocated": _get(dataset, "BitsAllocated"),
        "bits_stored": _get(dataset, "BitsStored"),
        "photometric_interpretation": _get(dataset, "PhotometricInterpretation"),
        "transfer_syntax": str(uid) if uid else None,
        "transfer_syntax_name": uid.name if uid else None,
        "compressed": bool(uid.is_compressed) if uid else None,
    }


def _get(dataset: Dataset, keyword: str) -> Any:
    """A value for the summary (JSON-safe), or its raw text when pydicom
    cannot convert it (a damaged file)."""
    try:
        value = dataset.get(keyword)
    except Exception:
        raw = dataset.get_item(keyword)
        value = raw.value.decode("ascii", "replace").strip() if raw is not None else None
    if isinstance(value, int | float | str) or value is None:
        return int(value) if isinstance(value, int) else value
    return str(value)


def pixel_info_lines(dataset: Dataset) -> list[str]:
    info = pixel_info(dataset)
    if info is None:
        return ["no pixel data"]
    state = {True: "compressed", False: "uncompressed", None: "unknown compression"}[info["compressed"]]
    return [
        f"pixels: {info['rows']} rows x {info['columns']} columns, {info['frames']} frame(s), "
        f"{info['samples_per_pixel']} sample(s) per pixel",
        f"bits: {info['bits_allocated']} allocated, {info['bits_stored']} stored; "
        f"photometric: {info['photometric_interpretation']}",
        f"transfer syntax: {info['transfer_syntax_name']} ({info['transfer_syntax']}), {state}",
    ]


def _json_entry(path: Path, dataset: Dataset, with_pixels: bool) -> dict[str, Any]:
    def bulk_uri(element: DataElement) -> str:
        return f"{path.absolute().as_uri()}#{int(element.tag):08X}"

    entry: dict[str, Any] = {
        "path": str(path),
        "status": "OK",
        "dataset": dataset_to_model(
            dataset, bulk_handler=bulk_uri, bulk_threshold=4 * ((JSON_BULK_THRESHOLD + 2) // 3)
        ),
    }
    if with_pixels:
        entry["pixels"] = pixel_info(dataset)
    return entry
