"""``pacs worklist add|list|remove``: the Modality Worklist by hand.

Until an order feed (HL7 / FHIR) fills it, an operator schedules procedures
here: from options, from a DICOM JSON file (one dataset, or a list with one)
or from a DICOM file (a worklist item or query response), options overriding
what the file says.  What modalities then get from a worklist C-FIND is the
stored item.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs_common.cli.common import CliError, database_settings
from pacs_common.localrun.infra import run_sync

if TYPE_CHECKING:
    from pacs_common.settings import DatabaseSettings
    from pacs_common.workflow.worklist import WorklistItem

_START = re.compile(r"^(\d{8})(\d{2,6})?$")

# option dest → (tag, VR); top level of the item
_TOP_OPTIONS: dict[str, tuple[str, str]] = {
    "patient_id": ("00100020", "LO"),
    "patient_name": ("00100010", "PN"),
    "birth_date": ("00100030", "DA"),
    "sex": ("00100040", "CS"),
    "accession": ("00080050", "SH"),
    "requested_procedure_id": ("00401001", "SH"),
    "procedure_description": ("00321060", "LO"),
    "study_uid": ("0020000D", "UI"),
    "referring_physician": ("00080090", "PN"),
}
# option dest → (tag, VR); in the Scheduled Procedure Step Sequence item
_STEP_OPTIONS: dict[str, tuple[str, str]] = {
    "modality": ("00080060", "CS"),
    "station_ae": ("00400001", "AE"),
    "station_name": ("00400010", "SH"),
    "sps_id": ("00400009", "SH"),
    "sps_description": ("00400007", "LO"),
    "performing_physician": ("00400006", "PN"),
}
_SPS_SEQUENCE = "00400100"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("worklist", help="schedule, list and remove Modality Worklist items")
    commands = parser.add_subparsers(dest="worklist_command", metavar="{add,list,remove}", required=True)

    add = commands.add_parser("add", help="schedule a procedure step")
    add.add_argument("--file", type=Path, metavar="PATH", help="a DICOM JSON or DICOM file to start from")
    add.add_argument("--patient-id")
    add.add_argument("--patient-name", help="DICOM PN, e.g. DOE^JANE")
    add.add_argument("--birth-date", metavar="YYYYMMDD")
    add.add_argument("--sex", choices=["M", "F", "O"])
    add.add_argument("--accession")
    add.add_argument("--requested-procedure-id")
    add.add_argument("--procedure-description", help="Requested Procedure Description")
    add.add_argument("--study-uid", help="Study Instance UID (generated when absent)")
    add.add_argument("--referring-physician")
    add.add_argument("--modality")
    add.add_argument("--station-ae", help="Scheduled Station AE Title")
    add.add_argument("--station-name")
    add.add_argument("--start", metavar="YYYYMMDDHHMM", help="scheduled start (date, and time if given)")
    add.add_argument("--sps-id", help="Scheduled Procedure Step ID (generated when absent)")
    add.add_argument("--sps-description")
    add.add_argument("--performing-physician", help="Scheduled Performing Physician's Name")
    add.add_argument("--json", action="store_true", help="print the stored item(s) as JSON")
    add.set_defaults(handler=run_add)

    listing = commands.add_parser("list", help="show scheduled items, earliest first")
    listing.add_argument("--status", help="only items with this SPS status (SCHEDULED, IN PROGRESS...)")
    listing.add_argument("--limit", type=int, default=1000, metavar="N")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=run_list)

    remove = commands.add_parser("remove", help="remove items")
    remove.add_argument("pks", nargs="*", type=int, metavar="ID", help="item ids (see list)")
    remove.add_argument("--accession", help="every item with this Accession Number")
    remove.set_defaults(handler=run_remove)


def _element(vr: str, value: str) -> dict[str, Any]:
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": [value]}


def _from_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw.lstrip()[:1] in (b"{", b"["):
        try:
            loaded = json.loads(raw)
        except ValueError as exc:
            raise CliError(f"{path}: not valid JSON: {exc}") from exc
        if isinstance(loaded, list) and len(loaded) == 1:
            loaded = loaded[0]
        if not isinstance(loaded, dict):
            raise CliError(f"{path}: expected one DICOM JSON dataset")
        return loaded
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from pacs_common.workflow.dicom_json import to_json

    try:
        return to_json(dcmread(path, force=True))
    except (InvalidDicomError, ValueError, TypeError, AttributeError) as exc:
        raise CliError(f"{path}: neither DICOM JSON nor a DICOM file ({exc})") from exc


def build_item(args: argparse.Namespace) -> dict[str, Any]:
    """The item the options (over the file, if any) describe, as DICOM JSON."""
    item: dict[str, Any] = _from_file(args.file) if args.file else {}
    for dest, (tag, vr) in _TOP_OPTIONS.items():
        value = getattr(args, dest)
        if value:
            item[tag] = _element(vr, value)
    steps = item.get(_SPS_SEQUENCE, {}).get("Value") or [{}]
    step: dict[str, Any] = steps[0]
    for dest, (tag, vr) in _STEP_OPTIONS.items():
        value = getattr(args, dest)
        if value:
            step[tag] = _element(vr, value)
    if args.start:
        match = _START.match(args.start)
        if match is None:
            raise CliError("--start: expected YYYYMMDD or YYYYMMDDHHMM[SS]")
        step["00400002"] = _element("DA", match.group(1))
        if match.group(2):
            step["00400003"] = _element("TM", match.group(2))
    item[_SPS_SEQUENCE] = {"vr": "SQ", "Value": [step, *steps[1:]]}
    return item


def run_add(args: argparse.Namespace) -> int:
    from pacs_common.workflow.worklist import WorklistItemError, add_item

    item = build_item(args)
    settings = database_settings(args.project_dir)

    async def add() -> list[WorklistItem]:
        async with _pool(settings) as pool:
            return await add_item(pool, item)

    try:
        added = run_sync(add)
    except WorklistItemError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps([_public(i) for i in added], indent=2, ensure_ascii=False))
        return 0
    for entry in added:
        print(f"scheduled item {entry.pk}: {_line(entry)}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from pacs_common.workflow.worklist import list_items

    settings = database_settings(args.project_dir)

    async def fetch() -> list[WorklistItem]:
        async with _pool(settings) as pool:
            return await list_items(pool, status=args.status, limit=args.limit)

    items = run_sync(fetch)
    if args.json:
        print(json.dumps([_public(i) for i in items], indent=2, ensure_ascii=False))
        return 0
    if not items:
        print("no worklist items")
        return 0
    print(
        f"{'ID':>6}  {'START':<13}  {'MOD':<4}  {'STATION':<16}  {'STATUS':<12}  {'ACCESSION':<16}  PATIENT"
    )
    for entry in items:
        start = f"{entry.sps_start_date or '-'} {(entry.sps_start_time or '')[:4]}".strip()
        print(
            f"{entry.pk:>6}  {start:<13}  {entry.modality or '-':<4}  "
            f"{entry.scheduled_station_ae_title or '-':<16}  {entry.sps_status:<12}  "
            f"{entry.accession_number or '-':<16}  {entry.patient_id} {entry.patient_name or ''}"
        )
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from pacs_common.workflow.worklist import remove_items

    if not args.pks and not args.accession:
        raise CliError("say what to remove: item ids or --accession")
    settings = database_settings(args.project_dir)

    async def remove() -> int:
        async with _pool(settings) as pool:
            return await remove_items(pool, pks=args.pks, accession_number=args.accession)

    removed = run_sync(remove)
    if removed == 0:
        raise CliError("no such worklist item")
    print(f"removed {removed} worklist item(s)")
    return 0


def _line(entry: WorklistItem) -> str:
    return (
        f"{entry.patient_id} {entry.patient_name or ''} / accession {entry.accession_number or '-'} / "
        f"{entry.modality or '-'} at {entry.scheduled_station_ae_title or '-'} "
        f"{entry.sps_start_date or ''} {entry.sps_start_time or ''} / SPS {entry.sps_id}"
    )


def _public(entry: WorklistItem) -> dict[str, Any]:
    return entry.model_dump(mode="json")


class _pool:  # noqa: N801 - used as a context manager, like a function
    """A small asyncpg pool for one command, errors turned into CliError."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self._settings = settings.model_copy(update={"pool_min_size": 0, "pool_max_size": 2})
        self._pool: Any = None

    async def __aenter__(self) -> Any:
        import asyncpg

        from pacs_common.db.pool import create_pool
        from pacs_common.localrun.infra import describe_error

        try:
            self._pool = await create_pool(self._settings, application_name="pacs-cli")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise CliError(f"database unreachable: {describe_error(exc)}") from exc
        return self._pool

    async def __aexit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            await self._pool.close()
