"""``pacs to-xml`` / ``pacs from-xml``: Part 10 files as the PS3.19 Native
DICOM Model (XML) and back.

Same options, naming and file meta rule as :mod:`pacs_common.cli.to_json`
(group 0002 attributes first in the ``NativeDicomModel``; ``BulkData uri=``
for bulk values in files).  ``from-xml`` also reads DCMTK's
``dcm2xml --native-format +Eb`` output (binary values as base64).
"""

from __future__ import annotations

import argparse
from typing import Any

from pacs_common.cli.files import FileError
from pacs_common.cli.to_json import add_export_arguments, add_import_arguments, export_files, import_files
from pacs_common.dicom.native_xml import NativeXmlError, model_from_xml, model_to_xml


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = subparsers.add_parser(
        "to-xml",
        help="write DICOM files as PS3.19 Native DICOM Model XML (file meta included)",
        description="Write each DICOM file as a PS3.19 Native DICOM Model document, file meta first, "
        "bulk data inline (InlineBinary) or in files referenced by BulkData uri=.",
    )
    add_export_arguments(export)
    export.set_defaults(handler=run_to_xml)
    back = subparsers.add_parser(
        "from-xml",
        help="write PS3.19 Native DICOM Model XML documents as DICOM files",
        description="Write each Native DICOM Model document (directories: *.xml) as a Part 10 file.",
    )
    add_import_arguments(back, "Native DICOM Model XML files or directories")
    back.set_defaults(handler=run_from_xml)


def run_to_xml(args: argparse.Namespace) -> int:
    return export_files(args, "to-xml", ".xml", model_to_xml)


def run_from_xml(args: argparse.Namespace) -> int:
    return import_files(args, "from-xml", ".xml", _xml_model)


def _xml_model(data: bytes) -> dict[str, Any]:
    try:
        return model_from_xml(data)
    except NativeXmlError as exc:
        raise FileError(str(exc)) from exc
