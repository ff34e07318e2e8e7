"""``pacs convert SRC... -o OUTDIR --transfer-syntax TS``: change the transfer
syntax of DICOM files (folders walked recursively), with
:func:`pacs_common.dicom.transcode.transcode_file` (pydicom + pylibjpeg):
uncompressed syntaxes and the lossless encoders available here.

Each file goes to ``OUTDIR/<relative path>``; the instance keeps its SOP
Instance UID.  A file whose pixel data cannot be decoded or encoded is
reported and the others go on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from pacs_common.cli.common import CliError
from pacs_common.cli.files import (
    FileError,
    FileReport,
    InputFile,
    OutputNames,
    add_inputs_argument,
    add_json_argument,
    input_files,
    output_path,
    run_per_file,
)
from pacs_common.dicom.transcode import TranscodeError, transcode_file

#: Names accepted for ``--transfer-syntax`` besides UIDs.
ALIASES: dict[str, UID] = {
    "explicit-le": ExplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "rle-lossless": RLELossless,
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpegls-lossless": JPEGLSLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "j2k-lossless": JPEG2000Lossless,
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="change the transfer syntax of DICOM files",
        description="Write DICOM files in another transfer syntax (uncompressed or lossless). "
        f"TS is a UID or one of: {', '.join(ALIASES)}.",
    )
    add_inputs_argument(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="where to write")
    parser.add_argument(
        "-t", "--transfer-syntax", required=True, metavar="TS", help="target transfer syntax: UID or name"
    )
    add_json_argument(parser)
    parser.set_defaults(handler=run)


def transfer_syntax(text: str) -> UID:
    """The UID ``text`` names (an alias, a pydicom keyword or a UID)."""
    alias = ALIASES.get(text.strip().lower())
    if alias is not None:
        return alias
    uid = UID(text.strip())
    if uid.is_valid and uid.is_transfer_syntax:
        return uid
    import pydicom.uid

    named = getattr(pydicom.uid, text.strip(), None)
    if isinstance(named, UID) and named.is_transfer_syntax:
        return named
    raise CliError(f"unknown transfer syntax {text!r}: give a UID or one of {', '.join(ALIASES)}")


def run(args: argparse.Namespace) -> int:
    target_syntax = transfer_syntax(args.transfer_syntax)
    outdir: Path = args.output.absolute()
    report = FileReport("convert", json_output=args.json)
    names = OutputNames()

    def process(item: InputFile) -> str:
        target = names.claim(output_path(outdir, item), item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            transcode_file(item.path, target, target_syntax)
        except TranscodeError as exc:
            raise FileError(str(exc)) from exc
        return f"-> {target} ({target_syntax.name})"

    run_per_file(report, input_files(args.inputs, exclude=outdir, on_missing=report.missing), process)
    return report.finish()
