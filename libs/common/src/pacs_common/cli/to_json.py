"""``pacs to-json`` / ``pacs from-json``: Part 10 files as the DICOM JSON
model (PS3.18 F.2) and back.

``to-json SRC... -o OUTDIR`` writes ``OUTDIR/<relative path>.json`` per
DICOM file: one JSON object holding the file meta (group 0002, first) and the
dataset.  Binary values are inline (``InlineBinary``) or, with ``--bulk-data
files``, those longer than ``--bulk-threshold`` bytes go to
``<name>.bulk/NNNN-TAG.bin`` beside the JSON, referenced by a relative
``BulkDataURI``.  ``from-json SRC... -o OUTDIR`` reads such documents (and
any PS3.18 JSON object; directories are searched for ``*.json``) and writes
``OUTDIR/<relative path without .json>`` (``+ .dcm`` when the name did not
end in ``.json``) as Part 10 files.  See
:mod:`pacs_common.dicom.json_files` for the rules.

The XML commands (:mod:`pacs_common.cli.to_xml`) share the code here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacs_common.cli.files import (
    FileError,
    FileReport,
    InputFile,
    OutputNames,
    add_inputs_argument,
    add_json_argument,
    input_files,
    output_path,
    read_dicom,
    run_per_file,
)
from pacs_common.dicom.json_files import (
    INLINE,
    BulkDataFiles,
    dataset_to_model,
    model_to_dataset,
    write_part10,
)

DEFAULT_BULK_THRESHOLD = 1024

Serializer = Callable[[dict[str, Any]], bytes]
Parser = Callable[[bytes], dict[str, Any]]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = subparsers.add_parser(
        "to-json",
        help="write DICOM files as PS3.18 DICOM JSON (file meta included)",
        description="Write each DICOM file as a DICOM JSON (PS3.18 F.2) object, file meta first, "
        "bulk data inline or in files referenced by relative BulkDataURIs.",
    )
    add_export_arguments(export)
    export.set_defaults(handler=run_to_json)
    back = subparsers.add_parser(
        "from-json",
        help="write PS3.18 DICOM JSON documents as DICOM files",
        description="Write each DICOM JSON document (directories: *.json) as a Part 10 file; "
        "relative and file: BulkDataURIs are read.",
    )
    add_import_arguments(back, "DICOM JSON files or directories")
    back.set_defaults(handler=run_from_json)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_inputs_argument(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="where to write")
    parser.add_argument(
        "--bulk-data",
        choices=("inline", "files"),
        default="inline",
        help="binary values inline as base64 (default) or in files beside the document",
    )
    parser.add_argument(
        "--bulk-threshold",
        type=int,
        default=DEFAULT_BULK_THRESHOLD,
        metavar="BYTES",
        help=f"with --bulk-data files: values longer than this go to files (default {DEFAULT_BULK_THRESHOLD})",
    )
    add_json_argument(parser)


def add_import_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    add_inputs_argument(parser, what)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="where to write")
    add_json_argument(parser)


def run_to_json(args: argparse.Namespace) -> int:
    return export_files(args, "to-json", ".json", _json_bytes)


def run_from_json(args: argparse.Namespace) -> int:
    return import_files(args, "from-json", ".json", _json_model)


def export_files(args: argparse.Namespace, command: str, suffix: str, serialize: Serializer) -> int:
    """Write each DICOM input as a document (``serialize`` of its JSON model)."""
    outdir: Path = args.output.absolute()
    report = FileReport(command, json_output=args.json)
    threshold = _base64_length(args.bulk_threshold) if args.bulk_data == "files" else INLINE
    names = OutputNames()

    def process(item: InputFile) -> str:
        dataset = read_dicom(item.path)
        target = names.claim(output_path(outdir, item, add=suffix), item.path)
        handler = None
        if args.bulk_data == "files":
            handler = BulkDataFiles(target.parent / f"{item.relative.name}.bulk", target.parent)
        try:
            document = serialize(dataset_to_model(dataset, bulk_handler=handler, bulk_threshold=threshold))
        except Exception as exc:
            raise FileError(f"cannot convert: {type(exc).__name__}: {exc}") from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(document)
        return f"-> {target}"

    run_per_file(report, input_files(args.inputs, exclude=outdir, on_missing=report.missing), process)
    return report.finish()


def import_files(args: argparse.Namespace, command: str, suffix: str, parse: Parser) -> int:
    """Write each document input (``parse`` gives its JSON model) as a Part 10 file."""
    outdir: Path = args.output.absolute()
    report = FileReport(command, json_output=args.json)
    names = OutputNames()

    def process(item: InputFile) -> str:
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            raise FileError(f"cannot read: {exc.strerror or exc}") from exc
        model = parse(data)
        try:
            dataset = model_to_dataset(model, item.path.parent)
        except Exception as exc:
            raise FileError(f"not a valid DICOM model: {type(exc).__name__}: {exc}") from exc
        target = output_path(outdir, item, strip=suffix)
        if target.name == item.relative.name:  # no suffix to strip: say what it is now
            target = target.with_name(f"{target.name}.dcm")
        names.claim(target, item.path)
        try:
            write_part10(dataset, target)
        except Exception as exc:
            raise FileError(f"cannot write a DICOM file: {type(exc).__name__}: {exc}") from exc
        return f"-> {target}"

    items = input_files(args.inputs, exclude=outdir, suffixes=(suffix,), on_missing=report.missing)
    run_per_file(report, items, process)
    return report.finish()


def _base64_length(size: int) -> int:
    """pydicom compares its threshold with the base64 length of a value."""
    return 4 * ((max(size, 0) + 2) // 3)


def _json_bytes(model: dict[str, Any]) -> bytes:
    return json.dumps(model, indent=1, ensure_ascii=False).encode("utf-8")


def _json_model(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileError(f"not JSON: {exc}") from exc
    if isinstance(document, list) and len(document) == 1:
        document = document[0]
    if not isinstance(document, dict):
        raise FileError("not a DICOM JSON object (expected one object, or an array of one)")
    return document
