"""``pacs send SRC... --host H --port P --called-ae T``: C-STORE DICOM files
(folders walked recursively) to a peer over one association.

The headers are read first: each file's SOP class and transfer syntax.  For
every SOP class one presentation context proposes Explicit and Implicit VR
Little Endian, and one more context per other (compressed, deflated, big
endian) transfer syntax the files are in, so that each file can go as it is
stored.  Files that cannot be read are reported and skipped; a file whose
context the peer rejected is reported as failed.  One progress line per file
with the C-STORE status, then a summary; exit code 1 when any file failed.
"""

from __future__ import annotations

import argparse
import ssl
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_common.cli.common import CliError
from pacs_common.cli.files import (
    FileError,
    FileReport,
    InputFile,
    add_inputs_argument,
    add_json_argument,
    input_files,
    read_dicom,
)
from pacs_common.nodes import tls_client_context

#: PS3.8 9.3.2.2: at most 128 presentation contexts (odd ids 1-255) per association.
MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
STATUS_SUCCESS = 0x0000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "send",
        help="C-STORE DICOM files and folders to a peer over one association",
        description="Send DICOM files (folders walked recursively) to a DICOM peer with C-STORE, "
        "over one association proposing every SOP class and transfer syntax of the files.",
    )
    add_inputs_argument(parser)
    parser.add_argument("--host", required=True, help="the peer's host name or address")
    parser.add_argument("--port", type=int, required=True, help="the peer's port")
    parser.add_argument("--called-ae", required=True, metavar="AET", help="the peer's AE title")
    parser.add_argument("--calling-ae", default="PACS_SEND", metavar="AET", help="our AE title")
    parser.add_argument("--tls", action="store_true", help="use TLS (the peer's certificate is verified)")
    parser.add_argument("--ca-file", type=Path, help="with --tls: CA certificates to verify the peer")
    parser.add_argument("--cert-file", type=Path, help="with --tls: our client certificate")
    parser.add_argument("--key-file", type=Path, help="with --tls: the key of --cert-file")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    add_json_argument(parser)
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class _Candidate:
    path: Path
    sop_class: UID
    transfer_syntax: UID


def run(args: argparse.Namespace) -> int:
    report = FileReport("send", json_output=args.json)
    candidates: list[_Candidate] = []
    for item in input_files(args.inputs, on_missing=report.missing):
        try:
            candidates.append(_candidate(item))
        except FileError as exc:
            report.error(item.path, str(exc))
    if not candidates:
        return report.finish()
    contexts = _contexts(candidates)
    if len(contexts) > MAX_CONTEXTS:
        raise CliError(
            f"the files need {len(contexts)} presentation contexts (SOP class x transfer syntax), "
            f"more than the {MAX_CONTEXTS} of one association: send fewer kinds of files at once"
        )
    _send(args, candidates, contexts, report)
    return report.finish()


def _candidate(item: InputFile) -> _Candidate:
    dataset = read_dicom(item.path, stop_before_pixels=True)
    sop_class = dataset.file_meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID")
    if not sop_class:
        raise FileError("no SOP Class UID")
    if "SOPInstanceUID" not in dataset:
        raise FileError("no SOP Instance UID")
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise FileError("no Transfer Syntax UID in the file meta")
    return _Candidate(item.path, UID(str(sop_class)), UID(str(syntax)))


def _contexts(candidates: list[_Candidate]) -> list[tuple[UID, list[UID]]]:
    """(abstract syntax, transfer syntaxes) to propose, in first-seen order."""
    extra: dict[UID, list[UID]] = defaultdict(list)
    for candidate in candidates:
        syntaxes = extra[candidate.sop_class]
        if candidate.transfer_syntax not in _UNCOMPRESSED and candidate.transfer_syntax not in syntaxes:
            syntaxes.append(candidate.transfer_syntax)
    contexts: list[tuple[UID, list[UID]]] = []
    for sop_class, syntaxes in extra.items():
        contexts.append((sop_class, list(_UNCOMPRESSED)))
        contexts.extend((sop_class, [syntax]) for syntax in syntaxes)
    return contexts


def _tls_args(args: argparse.Namespace) -> tuple[ssl.SSLContext, str] | None:
    if not args.tls:
        return None
    try:
        return tls_client_context(args.ca_file, args.cert_file, args.key_file), args.host
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot set up TLS: {exc}") from exc


def _send(
    args: argparse.Namespace,
    candidates: list[_Candidate],
    contexts: list[tuple[UID, list[UID]]],
    report: FileReport,
) -> None:
    from pynetdicom import AE
    from pynetdicom.status import code_to_category

    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate(args.host, args.port, ae_title=args.called_ae, tls_args=_tls_args(args))
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = getattr(primitive, "reason_str", "") if primitive is not None else ""
        raise CliError(f"association rejected by {args.called_ae}: {reason or 'no reason given'}")
    if not assoc.is_established:
        raise CliError(f"no association with {args.host}:{args.port} (unreachable, aborted or timed out)")
    try:
        for number, candidate in enumerate(candidates, start=1):
            progress = f"[{number}/{len(candidates)}]"
            if not assoc.is_established:
                report.error(candidate.path, f"{progress} not sent: the association was lost")
                continue
            try:
                status = assoc.send_c_store(candidate.path, msg_id=number % 65536)
            except (ValueError, RuntimeError) as exc:
                # pynetdicom: no accepted presentation context for this file
                report.error(candidate.path, f"{progress} not sent: {exc}")
                continue
            except Exception as exc:  # a file that fails to encode: report, go on
                report.error(candidate.path, f"{progress} not sent: {type(exc).__name__}: {exc}")
                continue
            if "Status" not in status:
                report.error(candidate.path, f"{progress} no C-STORE response (timeout or abort)")
                continue
            code = int(status.Status)
            category = code_to_category(code)
            text = f"{progress} status 0x{code:04X} ({category})"
            if code == STATUS_SUCCESS or category == "Warning":
                report.ok(candidate.path, text)
            else:
                report.error(candidate.path, text)
    finally:
        if assoc.is_established:
            assoc.release()
