"""``pacs sign`` and ``pacs verify-signature``: DICOM digital signatures
(PS3.15 Annex C, Base RSA Digital Signature Profile) of files.

``pacs sign FILE|DIR... -o OUTDIR [--key --cert --purpose --mac]`` writes a
signed copy of each DICOM file under ``OUTDIR`` (same relative path for the
files of a directory, the file name otherwise).  The key and certificate
default to ``PACS_SIGNATURE_KEY_FILE`` / ``PACS_SIGNATURE_CERTIFICATE_FILE``.

``pacs verify-signature FILE|DIR... [--ca FILE]... [--json]`` reports each
signature of each file: valid, invalid (a signed element changed),
untrusted-certificate or expired.  Trust anchors default to
``PACS_SIGNATURE_TRUST_ANCHORS``; without any, only integrity and the
certificate's validity period are checked.  Exit code 1 when a signature is
not valid or a file cannot be read; an unsigned file is reported, not a
failure (``--require`` makes it one).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydantic import BaseModel, ValidationError
from pydicom.errors import InvalidDicomError

from pacs_common.cli.common import CliError
from pacs_common.dicom.signature_settings import (
    SignatureSettings,
    SignatureSetupError,
    Signer,
    load_certificate,
    load_certificates,
    load_private_key,
)
from pacs_common.dicom.signatures import (
    PURPOSES,
    SIGNING_MAC_ALGORITHMS,
    SignatureError,
    SignaturePurpose,
    SignatureReport,
    SignatureStatus,
    sign,
    verify,
)

EXIT_OK = 0
EXIT_FAILURE = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    purposes = ", ".join(f"{p.value}={m}" for p, m in PURPOSES.items())
    signer = subparsers.add_parser(
        "sign",
        help="write digitally signed copies of DICOM files (PS3.15 Annex C, Base RSA profile)",
        description="Sign DICOM files and directories (recursively) with an X.509 certificate and its RSA "
        "key; the signed copies go under OUTDIR.",
    )
    signer.add_argument("inputs", nargs="+", type=Path, metavar="FILE|DIR")
    signer.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    signer.add_argument("--key", type=Path, help="RSA private key, PEM or DER (PACS_SIGNATURE_KEY_FILE)")
    signer.add_argument("--cert", type=Path, help="X.509 certificate (PACS_SIGNATURE_CERTIFICATE_FILE)")
    signer.add_argument(
        "--purpose",
        choices=[p.value for p in SignaturePurpose],
        help=f"CID 7007 signature purpose: {purposes}",
    )
    signer.add_argument("--mac", choices=SIGNING_MAC_ALGORITHMS, help="MAC algorithm (default SHA256)")
    signer.add_argument(
        "--element", action="append", metavar="KEYWORD", help="sign only these elements (and the UIDs)"
    )
    signer.set_defaults(handler=run_sign)

    verifier = subparsers.add_parser(
        "verify-signature",
        help="verify the digital signatures of DICOM files",
        description="Verify every digital signature of DICOM files and directories (recursively).",
    )
    verifier.add_argument("inputs", nargs="+", type=Path, metavar="FILE|DIR")
    verifier.add_argument(
        "--ca", action="append", type=Path, metavar="FILE", help="trust anchor certificate(s) (PEM or DER)"
    )
    verifier.add_argument("--require", action="store_true", help="an unsigned file is a failure")
    verifier.add_argument("--json", action="store_true", help="machine-readable output")
    verifier.set_defaults(handler=run_verify)


def _settings() -> SignatureSettings:
    try:
        return SignatureSettings()
    except ValidationError as exc:
        raise CliError(f"invalid signature settings: {exc.errors()[0]['msg']}") from exc


def _files(inputs: Sequence[Path], output: Path | None = None) -> Iterator[tuple[Path, Path]]:
    """(file, path relative to the output) of the inputs; directories walked in name order."""
    for given in inputs:
        if given.is_dir():
            for path in sorted(given.rglob("*")):
                if path.is_file() and not (output is not None and path.absolute().is_relative_to(output)):
                    yield path, path.relative_to(given)
        else:
            yield given, Path(given.name)


def _signer(args: argparse.Namespace) -> Signer:
    settings = _settings()
    try:
        key_file = args.key or settings.key_file
        cert_file = args.cert or settings.certificate_file
        if key_file is None or cert_file is None:
            raise CliError(
                "give --key and --cert (or PACS_SIGNATURE_KEY_FILE and PACS_SIGNATURE_CERTIFICATE_FILE)"
            )
        password = settings.key_password.get_secret_value().encode() if settings.key_password else None
        return Signer(
            key=load_private_key(key_file, password),
            certificate=load_certificate(cert_file),
            purpose=SignaturePurpose(args.purpose) if args.purpose else settings.purpose,
            mac_algorithm=args.mac or settings.mac_algorithm,
        )
    except SignatureSetupError as exc:
        raise CliError(str(exc)) from exc


def run_sign(args: argparse.Namespace) -> int:
    signer = _signer(args)
    output: Path = args.output.absolute()
    written = 0
    failed: list[tuple[Path, str]] = []
    for path, relative in _files(args.inputs, output):
        try:
            dataset = pydicom.dcmread(path)
            sign(
                dataset,
                signer.key,
                signer.certificate,
                purpose=signer.purpose,
                elements=args.element,
                mac_algorithm=signer.mac_algorithm,
            )
            target = output / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            dataset.save_as(target, enforce_file_format=True)
        except (InvalidDicomError, SignatureError, OSError, ValueError, KeyError) as exc:
            failed.append((path, str(exc)))
            continue
        written += 1
    for path, reason in failed:
        print(f"pacs sign: failed {path}: {reason}", file=sys.stderr)
    print(f"signed {written} file(s) into {output}; failed {len(failed)}")
    return EXIT_FAILURE if failed else EXIT_OK


class FileReport(BaseModel):
    path: str
    error: str | None = None
    signatures: list[SignatureReport] = []


def run_verify(args: argparse.Namespace) -> int:
    anchors = None
    try:
        if args.ca:
            anchors = [c for path in args.ca for c in load_certificates(path)]
        else:
            anchors = _settings().anchors()
    except SignatureSetupError as exc:
        raise CliError(str(exc)) from exc
    reports: list[FileReport] = []
    for path, _ in _files(args.inputs):
        try:
            dataset = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            reports.append(FileReport(path=str(path), error=f"not a readable DICOM file: {exc}"))
            continue
        reports.append(FileReport(path=str(path), signatures=verify(dataset, trust_anchors=anchors)))
    failed = any(
        r.error
        or any(s.status is not SignatureStatus.VALID for s in r.signatures)
        or (args.require and not r.signatures)
        for r in reports
    )
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
    else:
        for report in reports:
            _print(report)
    return EXIT_FAILURE if failed else EXIT_OK


def _print(report: FileReport) -> None:
    if report.error:
        print(f"{report.path}: ERROR {report.error}")
        return
    if not report.signatures:
        print(f"{report.path}: no digital signature")
        return
    for n, s in enumerate(report.signatures, 1):
        print(f"{report.path}: signature {n} (MAC ID {s.mac_id}): {s.status.value.upper()}: {s.reason}")
        print(
            f"    signer {s.signer_subject} (issuer {s.signer_issuer}), signed {s.signed_at}, {s.mac_algorithm}"
        )
        if s.purpose:
            print(f"    purpose {s.purpose}")
        if s.status is SignatureStatus.INVALID and s.signed_elements and not s.changed_elements:
            print(f"    signed elements: {', '.join(s.signed_elements)}")
