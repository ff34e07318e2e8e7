"""``pacs export`` and ``pacs import``: DICOM media (File-sets with a DICOMDIR).

``pacs export STUDY_UID... -o DIR [--deidentify] [--explicit-le] [--zip FILE]``
writes the studies as a PS3.10 File-set (DICOMDIR + files under conformant
File IDs) into DIR, and/or as a zip of that set; instances are read from the
tiers the index names (``PACS_STORAGE_*``, ``PACS_DB_URL``).

``pacs import PATH... [--json]`` sends every DICOM file of File-sets,
folders, zips and files through the normal ingest path (hot tier + ingest
message, ``PACS_AMQP_*``); each file is reported (stored, not DICOM, broken
DICOMDIR record, refused with its reason).  Exit code 1 when anything was
not stored; what could be stored is stored all the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from pacs_common.cli.common import (
    CliError,
    broker_settings,
    connect_database,
    database_settings,
    deidentify_salt,
)
from pacs_common.localrun.infra import run_sync

if TYPE_CHECKING:
    from cryptography import x509

    from pacs_common.dicom.signature_settings import Signer

EXIT_OK = 0
EXIT_FAILURE = 1
HOT_TIER = "hot"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = subparsers.add_parser(
        "export",
        help="export studies as a DICOM File-set (DICOMDIR), to a folder and/or a zip",
        description="Write stored studies as a PS3.10 File-set: a DICOMDIR with PATIENT/STUDY/SERIES/"
        "IMAGE records and the instances under conformant File IDs.",
    )
    export.add_argument("studies", nargs="+", metavar="STUDY_UID", help="Study Instance UIDs")
    export.add_argument("-o", "--output", type=Path, metavar="DIR", help="folder to write the File-set into")
    export.add_argument("--zip", type=Path, metavar="FILE", help="also (or only) write the File-set as a zip")
    export.add_argument(
        "--deidentify",
        action="store_true",
        help="de-identify (PS3.15 Annex E basic profile; salt from --salt-file or PACS_DEIDENTIFY_SALT)",
    )
    export.add_argument("--salt-file", type=Path, metavar="FILE", help="file holding the secret salt")
    export.add_argument(
        "--explicit-le", action="store_true", help="transcode every instance to Explicit VR Little Endian"
    )
    export.add_argument(
        "--sign",
        action="store_true",
        help="digitally sign every instance (PS3.15 Annex C; key and certificate from PACS_SIGNATURE_*)",
    )
    export.set_defaults(handler=run_export)

    importing = subparsers.add_parser(
        "import",
        help="import DICOM File-sets (DICOMDIR), folders, zips and files through the ingest path",
        description="Store every DICOM file found as if it had been received (hot tier, ingest queue).",
    )
    importing.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="folders, zips or files")
    importing.add_argument("--json", action="store_true", help="print the report as JSON")
    importing.set_defaults(handler=run_import)


# -- export ------------------------------------------------------------------------


def _signer() -> Signer:
    from pacs_common.dicom.signature_settings import SignatureSettings, SignatureSetupError

    try:
        return SignatureSettings().signer()
    except (SignatureSetupError, ValidationError) as exc:
        raise CliError(f"--sign: {exc}") from exc


def _trust_anchors() -> list[x509.Certificate] | None:
    """Signatures of imported files are verified against PACS_SIGNATURE_TRUST_ANCHORS."""
    from pacs_common.dicom.signature_settings import SignatureSettings

    try:
        return SignatureSettings().anchors()
    except (ValidationError, OSError, ValueError) as exc:
        raise CliError(f"PACS_SIGNATURE_TRUST_ANCHORS: {exc}") from exc


def run_export(args: argparse.Namespace) -> int:
    from pacs_common.dicom.deidentify import Deidentifier
    from pacs_common.media.export import (
        DICOMDIR,
        ExportOptions,
        ExportSource,
        FileSetExporter,
        MissingStudiesError,
        find_export_sources,
    )
    from pacs_common.media.zipstream import write_zip
    from pacs_common.settings import StorageTiersSettings
    from pacs_common.storage import StorageRegistry

    if args.output is None and args.zip is None:
        raise CliError("give -o DIR, --zip FILE or both")
    if args.output is not None and (args.output / DICOMDIR).exists():
        raise CliError(f"{args.output} already holds a DICOMDIR")
    options = ExportOptions(
        deidentify=args.deidentify, explicit_vr_little_endian=args.explicit_le, sign=args.sign
    )
    deidentifier = Deidentifier(deidentify_salt(args.salt_file)) if args.deidentify else None
    signer = _signer() if args.sign else None
    settings = database_settings(args.project_dir)

    async def sources() -> list[ExportSource]:
        connection = await connect_database(settings)
        try:
            return list(await find_export_sources(connection, args.studies))
        finally:
            await connection.close()

    try:
        found = run_sync(sources)
    except MissingStudiesError as exc:
        raise CliError(str(exc)) from exc
    storage = StorageRegistry.from_settings(StorageTiersSettings().tiers)
    try:
        exporter = FileSetExporter(storage, options, deidentifier=deidentifier, signer=signer)
        with tempfile.TemporaryDirectory(prefix="pacs-export-") as scratch:
            target = args.output if args.output is not None else Path(scratch) / "fileset"
            result = exporter.export(found, target)
            if args.zip is not None and result.instances_written:
                write_zip(target, args.zip)
    finally:
        storage.close()
    for failure in result.failures:
        print(f"pacs export: failed {failure.sop_instance_uid}: {failure.reason}", file=sys.stderr)
    where = " and ".join(str(p) for p in (args.output, args.zip) if p is not None)
    print(
        f"exported {result.instances_written} instance(s) of {len(set(args.studies))} study(ies) "
        f"into {where}; failed {len(result.failures)}"
    )
    return EXIT_FAILURE if result.failures or not result.instances_written else EXIT_OK


# -- import ------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    from pacs_common.media.importing import ImportStatus, MediaImporter
    from pacs_common.messaging.blocking import BlockingPublisher
    from pacs_common.messaging.broker import PublishError
    from pacs_common.messaging.models import IngestSource
    from pacs_common.receiving import InstanceReceiver
    from pacs_common.settings import StorageTierSettings
    from pacs_common.storage.factory import build_storage

    publisher = BlockingPublisher(broker_settings(args.project_dir))
    try:
        publisher.start()
    except PublishError as exc:
        raise CliError(f"broker unreachable: {exc}") from exc
    storage = build_storage(StorageTierSettings.for_tier(HOT_TIER))
    try:
        receiver = InstanceReceiver(storage, HOT_TIER, publisher.publish_ingest)
        importer = MediaImporter(
            receiver, IngestSource(protocol="import", peer="pacs import"), trust_anchors=_trust_anchors()
        )
        report = importer.import_paths(args.paths)
    finally:
        storage.close()
        publisher.stop()
    if args.json:
        print(json.dumps({"summary": report.summary(), **report.model_dump(mode="json")}, indent=2))
    else:
        for item in report.files:
            reason = f": {item.reason}" if item.reason else ""
            signed = f" (signatures: {', '.join(item.signatures)})" if item.signatures else ""
            stream = sys.stdout if item.status == ImportStatus.STORED else sys.stderr
            print(f"{item.status.value:<13} {item.path}{reason}{signed}", file=stream)
        counts = report.summary()
        print(
            f"imported {counts['stored']} file(s); not DICOM {counts['not_dicom']}, "
            f"broken records {counts['broken_record']}, refused {counts['refused']}"
        )
    return EXIT_FAILURE if report.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m pacs_common.cli.media export|import ...``: the two commands
    on their own (the same as ``pacs export`` / ``pacs import``)."""
    import logging

    parser = argparse.ArgumentParser(prog="pacs", description="DICOM media export and import")
    parser.add_argument("-C", "--project-dir", type=Path, default=Path.cwd(), metavar="DIR")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    args.project_dir = args.project_dir.absolute()
    logging.basicConfig(level=logging.WARNING, format="pacs: %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except CliError as exc:
        print(f"pacs {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
