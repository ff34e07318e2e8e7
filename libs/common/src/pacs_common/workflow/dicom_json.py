"""Reading the few values the workflow tables need from DICOM JSON (PS3.18 F.2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from pydicom.dataset import Dataset

# Tags, as DICOM JSON keys.
SPECIFIC_CHARACTER_SET: Final = "00080005"
ACCESSION_NUMBER: Final = "00080050"
MODALITY: Final = "00080060"
REFERRING_PHYSICIAN_NAME: Final = "00080090"
REFERENCED_SOP_CLASS_UID: Final = "00081150"
REFERENCED_SOP_INSTANCE_UID: Final = "00081155"
PATIENT_NAME: Final = "00100010"
PATIENT_ID: Final = "00100020"
ISSUER_OF_PATIENT_ID: Final = "00100021"
PATIENT_BIRTH_DATE: Final = "00100030"
PATIENT_SEX: Final = "00100040"
STUDY_INSTANCE_UID: Final = "0020000D"
SERIES_INSTANCE_UID: Final = "0020000E"
REQUESTED_PROCEDURE_DESCRIPTION: Final = "00321060"
SCHEDULED_STATION_AE_TITLE: Final = "00400001"
SPS_START_DATE: Final = "00400002"
SPS_START_TIME: Final = "00400003"
SCHEDULED_PERFORMING_PHYSICIAN_NAME: Final = "00400006"
SPS_DESCRIPTION: Final = "00400007"
SPS_ID: Final = "00400009"
SCHEDULED_STATION_NAME: Final = "00400010"
SPS_STATUS: Final = "00400020"
SCHEDULED_PROCEDURE_STEP_SEQUENCE: Final = "00400100"
PPS_STATUS: Final = "00400252"
SCHEDULED_STEP_ATTRIBUTES_SEQUENCE: Final = "00400270"
PERFORMED_SERIES_SEQUENCE: Final = "00400340"
REQUESTED_PROCEDURE_ID: Final = "00401001"


def text(attributes: dict[str, Any], tag: str) -> str | None:
    """A value as a DICOM string: multiple values joined with backslash, PN
    component groups joined with '=', surrounding spaces dropped; None when
    absent or empty (the same form the index uses for its columns)."""
    element = attributes.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not values:
        return None
    parts: list[str] = []
    for value in values:
        if value is None:
            parts.append("")
        elif isinstance(value, dict):
            groups = [value.get("Alphabetic", ""), value.get("Ideographic", ""), value.get("Phonetic", "")]
            while groups and not groups[-1]:
                groups.pop()
            parts.append("=".join(str(g) for g in groups))
        elif isinstance(value, float) and value.is_integer():
            parts.append(str(int(value)))
        else:
            parts.append(str(value))
    joined = "\\".join(parts).strip()
    return joined or None


def items(attributes: dict[str, Any], tag: str) -> Iterator[dict[str, Any]]:
    """The items of a sequence (none when absent or empty)."""
    element = attributes.get(tag)
    if not isinstance(element, dict):
        return
    for item in element.get("Value") or []:
        if isinstance(item, dict):
            yield item


def first_item(attributes: dict[str, Any], tag: str) -> dict[str, Any]:
    return next(items(attributes, tag), {})


def to_json(dataset: Dataset) -> dict[str, Any]:
    """A pydicom dataset (decoded through its Specific Character Set) as
    DICOM JSON; without group 0000 and file meta."""
    converted: dict[str, Any] = dataset.to_json_dict(bulk_data_threshold=1 << 30)
    return {tag: value for tag, value in converted.items() if not tag.startswith(("0000", "0002"))}


def to_dataset(attributes: dict[str, Any]) -> Dataset:
    return Dataset.from_json(attributes)
