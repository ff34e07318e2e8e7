"""``pacs anonymize INPUT... --output DIR``: de-identified copies of DICOM files.

PS3.15 Annex E Basic Application Level Confidentiality Profile (see
:mod:`pacs_common.dicom.deidentify`).  Inputs are files and directories
(walked recursively).  Each DICOM file is written as a Part 10 file under
``DIR/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` with the
new UIDs, so no original file name (which may carry a patient's name) leaks.
Files that are not DICOM and DICOMDIRs are reported and skipped; a DICOM file
that cannot be read, de-identified or written is a failure (exit code 1),
and the others are still processed.

The salt comes from ``--salt-file`` or ``PACS_DEIDENTIFY_SALT``; the same
salt gives the same pseudonyms, UIDs and date shifts, so studies exported in
several runs stay consistent.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydantic import ValidationError
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from pacs_common.cli.common import CliError, deidentify_salt
from pacs_common.cli.files import input_files
from pacs_common.dicom.deidentify import (
    Deidentifier,
    DeidentifyOptions,
)

EXIT_OK = 0
EXIT_FAILURE = 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "anonymize",
        help="write de-identified copies of DICOM files (PS3.15 Annex E basic profile)",
        description="De-identify DICOM files and directories (recursively) per the PS3.15 Annex E "
        "Basic Application Level Confidentiality Profile.  The secret salt comes from --salt-file "
        "or PACS_DEIDENTIFY_SALT.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or directories")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="where to write")
    parser.add_argument("--salt-file", type=Path, metavar="FILE", help="file holding the secret salt")
    parser.add_argument("--patient-id", help="new Patient ID (default: a pseudonym from the salt)")
    parser.add_argument("--patient-name", help="new Patient's Name (default: a pseudonym from the salt)")
    parser.add_argument(
        "--retain-dates",
        action="store_true",
        help="Retain Longitudinal Temporal Information with Modified Dates: shift dates per patient",
    )
    parser.add_argument(
        "--retain-patient-characteristics", action="store_true", help="keep sex, age, size, weight..."
    )
    parser.add_argument(
        "--clean-descriptors",
        action="store_true",
        help="keep descriptions with identifying values cut out instead of removing them",
    )
    parser.set_defaults(handler=run)


@dataclass
class _Report:
    written: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    deidentifier = Deidentifier(deidentify_salt(args.salt_file), _options(args))
    output: Path = args.output.absolute()
    report = _Report()

    def missing(path: Path) -> None:
        report.failed.append((path, "no such file or directory"))

    for item in input_files(args.inputs, exclude=output, on_missing=missing):
        _process(item.path, output, deidentifier, report)
    for path, reason in report.skipped:
        print(f"pacs anonymize: skipped {path}: {reason}", file=sys.stderr)
    for path, reason in report.failed:
        print(f"pacs anonymize: failed {path}: {reason}", file=sys.stderr)
    print(
        f"anonymized {report.written} file(s) into {output}; "
        f"skipped {len(report.skipped)}, failed {len(report.failed)}"
    )
    return EXIT_FAILURE if report.failed else EXIT_OK


def _options(args: argparse.Namespace) -> DeidentifyOptions:
    try:
        return DeidentifyOptions(
            retain_longitudinal_modified_dates=args.retain_dates,
            retain_patient_characteristics=args.retain_patient_characteristics,
            clean_descriptors=args.clean_descriptors,
            patient_id=args.patient_id,
            patient_name=args.patient_name,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CliError(f"invalid option: {problems}") from exc


def _process(path: Path, output: Path, deidentifier: Deidentifier, report: _Report) -> None:
    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        report.skipped.append((path, "not a DICOM file"))
        return
    except Exception as exc:  # a damaged file: report it, go on with the others
        report.failed.append((path, f"unreadable: {exc}"))
        return
    if dataset.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        report.skipped.append((path, "a DICOMDIR (its references would not match the new files)"))
        return
    try:
        result = deidentifier.deidentify(dataset)
        target = output / str(result.StudyInstanceUID) / str(result.SeriesInstanceUID)
        target.mkdir(parents=True, exist_ok=True)
        result.save_as(target / f"{result.SOPInstanceUID}.dcm", enforce_file_format=True)
    except Exception as exc:  # one bad instance must not stop the others
        report.failed.append((path, f"{type(exc).__name__}: {exc}"))
        return
    report.written += 1
