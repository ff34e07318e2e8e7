"""Which DICOM attributes the index holds, at which level, in which column.

An attribute in this catalogue is matched in SQL and returned from its
column.  Any other attribute is *not indexed*: it is returned from the
stored DICOM JSON metadata of a representative instance of the entity, and a
matching key on it is applied to that metadata in Python (see
``query_service.metadata_match``).

Column expressions use the table aliases of ``query_service.sql``: ``p``
(patient), ``st`` (study), ``se`` (series), ``i`` (instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from pydicom.datadict import dictionary_VR

from pacs_common.query.models import InformationModel, QueryLevel

__all__ = [
    "LEVEL_DEPTH",
    "UNIQUE_KEYS",
    "Attribute",
    "Kind",
    "attribute_for",
    "level_of",
    "levels_from_root",
    "tags_of_level",
    "unique_keys_through",
    "vr_of",
]


class Kind(StrEnum):
    TEXT = "text"  # single value / wildcard, case-sensitive
    MULTI_TEXT = "multi-text"  # backslash-joined values, any may match
    PN = "pn"  # person name: component groups, case rules
    DATE = "date"
    TIME = "time"
    DATETIME = "datetime"
    UID = "uid"  # list of UID matching
    INT = "int"  # integer column (IS/US)
    NUMBER_TEXT = "number-text"  # DS kept as text
    TEXT_ARRAY = "text-array"  # text[] column (ModalitiesInStudy…): any element may match
    REQUEST_ATTRIBUTES = "request-attributes"  # jsonb Request Attributes Sequence items


@dataclass(frozen=True, slots=True)
class Attribute:
    tag: str  # "0020000D"
    keyword: str
    vr: str
    level: QueryLevel
    column: str  # SQL expression
    kind: Kind
    # Upper-cased column for case-insensitive PN matching.
    norm_column: str | None = None


PATIENT, STUDY, SERIES, IMAGE = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

LEVEL_DEPTH: Final = {PATIENT: 0, STUDY: 1, SERIES: 2, IMAGE: 3}

_PATIENT_STUDIES = "(SELECT count(*) FROM study x WHERE x.patient_fk = p.pk)"
_PATIENT_SERIES = (
    "(SELECT coalesce(sum(x.number_of_study_related_series), 0) FROM study x WHERE x.patient_fk = p.pk)"
)
_PATIENT_INSTANCES = (
    "(SELECT coalesce(sum(x.number_of_study_related_instances), 0) FROM study x WHERE x.patient_fk = p.pk)"
)

_CATALOGUE: Final[tuple[Attribute, ...]] = (
    # -- patient
    Attribute("00100010", "PatientName", "PN", PATIENT, "p.patient_name", Kind.PN, "p.patient_name_norm"),
    Attribute("00100020", "PatientID", "LO", PATIENT, "p.patient_id", Kind.TEXT),
    Attribute("00100021", "IssuerOfPatientID", "LO", PATIENT, "p.issuer_of_patient_id", Kind.TEXT),
    Attribute("00100030", "PatientBirthDate", "DA", PATIENT, "p.patient_birth_date", Kind.DATE),
    Attribute("00100040", "PatientSex", "CS", PATIENT, "p.patient_sex", Kind.TEXT),
    Attribute("00101000", "OtherPatientIDs", "LO", PATIENT, "p.other_patient_ids", Kind.MULTI_TEXT),
    Attribute("00104000", "PatientComments", "LT", PATIENT, "p.patient_comments", Kind.TEXT),
    Attribute("00201200", "NumberOfPatientRelatedStudies", "IS", PATIENT, _PATIENT_STUDIES, Kind.INT),
    Attribute("00201202", "NumberOfPatientRelatedSeries", "IS", PATIENT, _PATIENT_SERIES, Kind.INT),
    Attribute("00201204", "NumberOfPatientRelatedInstances", "IS", PATIENT, _PATIENT_INSTANCES, Kind.INT),
    # -- study
    Attribute("0020000D", "StudyInstanceUID", "UI", STUDY, "st.study_instance_uid", Kind.UID),
    Attribute("00080020", "StudyDate", "DA", STUDY, "st.study_date", Kind.DATE),
    Attribute("00080030", "StudyTime", "TM", STUDY, "st.study_time", Kind.TIME),
    Attribute("00080050", "AccessionNumber", "SH", STUDY, "st.accession_number", Kind.TEXT),
    Attribute("00200010", "StudyID", "SH", STUDY, "st.study_id", Kind.TEXT),
    Attribute(
        "00080090",
        "ReferringPhysicianName",
        "PN",
        STUDY,
        "st.referring_physician_name",
        Kind.PN,
        "st.referring_physician_name_norm",
    ),
    Attribute("00081030", "StudyDescription", "LO", STUDY, "st.study_description", Kind.TEXT),
    Attribute("00101010", "PatientAge", "AS", STUDY, "st.patient_age", Kind.TEXT),
    Attribute("00101020", "PatientSize", "DS", STUDY, "st.patient_size", Kind.NUMBER_TEXT),
    Attribute("00101030", "PatientWeight", "DS", STUDY, "st.patient_weight", Kind.NUMBER_TEXT),
    Attribute("00080061", "ModalitiesInStudy", "CS", STUDY, "st.modalities_in_study", Kind.TEXT_ARRAY),
    Attribute("00080062", "SOPClassesInStudy", "UI", STUDY, "st.sop_classes_in_study", Kind.TEXT_ARRAY),
    Attribute(
        "00201206", "NumberOfStudyRelatedSeries", "IS", STUDY, "st.number_of_study_related_series", Kind.INT
    ),
    Attribute(
        "00201208",
        "NumberOfStudyRelatedInstances",
        "IS",
        STUDY,
        "st.number_of_study_related_instances",
        Kind.INT,
    ),
    # -- series
    Attribute("0020000E", "SeriesInstanceUID", "UI", SERIES, "se.series_instance_uid", Kind.UID),
    Attribute("00080060", "Modality", "CS", SERIES, "se.modality", Kind.TEXT),
    Attribute("00200011", "SeriesNumber", "IS", SERIES, "se.series_number", Kind.INT),
    Attribute("0008103E", "SeriesDescription", "LO", SERIES, "se.series_description", Kind.TEXT),
    Attribute("00080021", "SeriesDate", "DA", SERIES, "se.series_date", Kind.DATE),
    Attribute("00080031", "SeriesTime", "TM", SERIES, "se.series_time", Kind.TIME),
    Attribute("00180015", "BodyPartExamined", "CS", SERIES, "se.body_part_examined", Kind.TEXT),
    Attribute("00200060", "Laterality", "CS", SERIES, "se.laterality", Kind.TEXT),
    Attribute("00181030", "ProtocolName", "LO", SERIES, "se.protocol_name", Kind.TEXT),
    Attribute("00081010", "StationName", "SH", SERIES, "se.station_name", Kind.TEXT),
    Attribute("00080080", "InstitutionName", "LO", SERIES, "se.institution_name", Kind.TEXT),
    Attribute(
        "00081040",
        "InstitutionalDepartmentName",
        "LO",
        SERIES,
        "se.institutional_department_name",
        Kind.TEXT,
    ),
    Attribute(
        "00081050",
        "PerformingPhysicianName",
        "PN",
        SERIES,
        "se.performing_physician_name",
        Kind.PN,
        "upper(se.performing_physician_name)",
    ),
    Attribute(
        "00081070", "OperatorsName", "PN", SERIES, "se.operators_name", Kind.PN, "upper(se.operators_name)"
    ),
    Attribute("00080070", "Manufacturer", "LO", SERIES, "se.manufacturer", Kind.TEXT),
    Attribute("00081090", "ManufacturerModelName", "LO", SERIES, "se.manufacturer_model_name", Kind.TEXT),
    Attribute(
        "00400244",
        "PerformedProcedureStepStartDate",
        "DA",
        SERIES,
        "se.performed_procedure_step_start_date",
        Kind.DATE,
    ),
    Attribute(
        "00400245",
        "PerformedProcedureStepStartTime",
        "TM",
        SERIES,
        "se.performed_procedure_step_start_time",
        Kind.TIME,
    ),
    Attribute(
        "00400275",
        "RequestAttributesSequence",
        "SQ",
        SERIES,
        "se.request_attributes",
        Kind.REQUEST_ATTRIBUTES,
    ),
    Attribute(
        "00201209",
        "NumberOfSeriesRelatedInstances",
        "IS",
        SERIES,
        "se.number_of_series_related_instances",
        Kind.INT,
    ),
    # -- instance
    Attribute("00080018", "SOPInstanceUID", "UI", IMAGE, "i.sop_instance_uid", Kind.UID),
    Attribute("00080016", "SOPClassUID", "UI", IMAGE, "i.sop_class_uid", Kind.UID),
    Attribute("00200013", "InstanceNumber", "IS", IMAGE, "i.instance_number", Kind.INT),
    Attribute("00080023", "ContentDate", "DA", IMAGE, "i.content_date", Kind.DATE),
    Attribute("00080033", "ContentTime", "TM", IMAGE, "i.content_time", Kind.TIME),
    Attribute("0008002A", "AcquisitionDateTime", "DT", IMAGE, "i.acquisition_datetime", Kind.DATETIME),
    Attribute("00280008", "NumberOfFrames", "IS", IMAGE, "i.number_of_frames", Kind.INT),
    Attribute("00280010", "Rows", "US", IMAGE, "i.rows", Kind.INT),
    Attribute("00280011", "Columns", "US", IMAGE, "i.columns", Kind.INT),
    Attribute("00280100", "BitsAllocated", "US", IMAGE, "i.bits_allocated", Kind.INT),
    Attribute(
        "00280004", "PhotometricInterpretation", "CS", IMAGE, "i.photometric_interpretation", Kind.TEXT
    ),
    Attribute("00080008", "ImageType", "CS", IMAGE, "i.image_type", Kind.MULTI_TEXT),
    Attribute("0040A491", "CompletionFlag", "CS", IMAGE, "i.completion_flag", Kind.TEXT),
    Attribute("0040A493", "VerificationFlag", "CS", IMAGE, "i.verification_flag", Kind.TEXT),
    Attribute("00083002", "AvailableTransferSyntaxUID", "UI", IMAGE, "i.transfer_syntax_uid", Kind.UID),
)

# InstanceAvailability is kept at every level but the patient's.
_AVAILABILITY: Final = {
    STUDY: Attribute("00080056", "InstanceAvailability", "CS", STUDY, "st.availability", Kind.TEXT),
    SERIES: Attribute("00080056", "InstanceAvailability", "CS", SERIES, "se.availability", Kind.TEXT),
    IMAGE: Attribute("00080056", "InstanceAvailability", "CS", IMAGE, "i.availability", Kind.TEXT),
}
_INSTANCE_AVAILABILITY: Final = "00080056"
_BY_TAG: Final = {attribute.tag: attribute for attribute in _CATALOGUE}

#: Unique key of each level.
UNIQUE_KEYS: Final = {
    PATIENT: _BY_TAG["00100020"],
    STUDY: _BY_TAG["0020000D"],
    SERIES: _BY_TAG["0020000E"],
    IMAGE: _BY_TAG["00080018"],
}


def attribute_for(tag: str, level: QueryLevel) -> Attribute | None:
    """The indexed attribute ``tag`` at a query of ``level`` (its own level or
    above), or None when it is not indexed there."""
    if tag == _INSTANCE_AVAILABILITY:
        return _AVAILABILITY.get(level)
    attribute = _BY_TAG.get(tag)
    if attribute is None or LEVEL_DEPTH[attribute.level] > LEVEL_DEPTH[level]:
        return None
    return attribute


def level_of(tag: str) -> QueryLevel | None:
    """The level of an indexed attribute (None: not in the catalogue)."""
    attribute = _BY_TAG.get(tag)
    return attribute.level if attribute else None


def levels_from_root(model: InformationModel, level: QueryLevel) -> list[QueryLevel]:
    """The levels of ``model`` from its root down to ``level``."""
    first = 0 if model is InformationModel.PATIENT_ROOT else 1
    return [lv for lv, depth in LEVEL_DEPTH.items() if first <= depth <= LEVEL_DEPTH[level]]


def unique_keys_through(model: InformationModel, level: QueryLevel) -> list[Attribute]:
    """Unique keys of ``level`` and the levels above it in ``model``."""
    return [UNIQUE_KEYS[lv] for lv in levels_from_root(model, level)]


def vr_of(tag: str) -> str:
    """The VR of a tag: the catalogue's, else the data dictionary's, else UN."""
    attribute = _BY_TAG.get(tag)
    if attribute is not None:
        return attribute.vr
    if tag == _INSTANCE_AVAILABILITY:
        return "CS"
    try:
        vr = dictionary_VR(int(tag, 16))
    except (KeyError, ValueError):
        return "UN"
    return vr.split(" or ")[0] if vr else "UN"


# Attributes of each level that are not in the catalogue, by module (PS3.3),
# for include_all: Patient; General Study / Patient Study; General Series,
# General Equipment, Frame of Reference.  Everything else is instance level.
_PATIENT_TAGS: Final = frozenset(
    {"00100010", "00100020", "00100021", "00100022", "00100024", "00100030", "00100032", "00100040",
     "00101000", "00101001", "00101002", "00101040", "00102160", "00102203", "00104000", "00120062",
     "00120063"}
)  # fmt: skip
_STUDY_TAGS: Final = frozenset(
    {"0020000D", "00080020", "00080030", "00080050", "00080051", "00080090", "00080096", "00081030",
     "00081032", "00081048", "00081060", "00081080", "00081110", "00200010", "00321032", "00321033",
     "00321060", "00321064", "00101010", "00101020", "00101030", "00102180", "001021B0", "00380010",
     "00380500", "00080061", "00080062", "00201206", "00201208"}
)  # fmt: skip
_SERIES_TAGS: Final = frozenset(
    {"0020000E", "00080060", "00200011", "00200060", "00080021", "00080031", "00081050", "00081052",
     "00181030", "0008103E", "0008103F", "00081070", "00081072", "00081111", "00081250", "00180015",
     "00185100", "00280108", "00280109", "00400244", "00400245", "00400250", "00400251", "00400253",
     "00400254", "00400260", "00400275", "00400280", "00080070", "00080080", "00080081", "00081010",
     "00081040", "00081090", "00181000", "00181020", "00181050", "00200052", "00201040", "00201209",
     "00080068", "00720070"}
)  # fmt: skip


def tags_of_level(level: QueryLevel) -> frozenset[str] | None:
    """Tags that belong to ``level`` and the levels above (None: every tag, the instance level)."""
    if level is QueryLevel.IMAGE:
        return None
    tags = set(_PATIENT_TAGS)
    if LEVEL_DEPTH[level] >= LEVEL_DEPTH[QueryLevel.STUDY]:
        tags |= _STUDY_TAGS
    if LEVEL_DEPTH[level] >= LEVEL_DEPTH[QueryLevel.SERIES]:
        tags |= _SERIES_TAGS
    tags |= {a.tag for a in _CATALOGUE if LEVEL_DEPTH[a.level] <= LEVEL_DEPTH[level]}
    return frozenset(tags)
