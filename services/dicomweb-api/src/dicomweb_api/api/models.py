"""Request and response bodies of the management REST API (``/api/v1``).

Remote nodes, worklist items and MPPS reuse the models of
``pacs_common`` (``RemoteNode*``, ``WorklistItem``, ``MppsRecord``); what
is defined here is what only this API says.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- system --------------------------------------------------------------------


class SystemVersion(_Public):
    service: str
    version: str
    # Versions of the PACS packages this process runs.
    components: dict[str, str]
    python: str


class ComponentHealth(_Public):
    status: Literal["ok", "failing"]
    latency_ms: float
    detail: str | None = None


class SystemHealth(_Public):
    status: Literal["ok", "degraded"]
    checks: dict[str, ComponentHealth]


class EffectiveConfiguration(_Public):
    """The settings this service runs with; passwords and secrets are redacted."""

    dicomweb: dict[str, Any]
    database: dict[str, Any]
    broker: dict[str, Any]
    storage: dict[str, dict[str, Any]]
    telemetry: dict[str, Any]


# -- archive -------------------------------------------------------------------


class Page(_Public, Generic[T]):
    """One page of a listing; ``total`` counts every match (also in ``X-Total-Count``)."""

    total: int
    limit: int
    offset: int
    items: list[T]


class PatientSummary(_Public):
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    number_of_studies: int
    created_at: datetime
    updated_at: datetime


class StudySummary(_Public):
    study_instance_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    referring_physician_name: str | None
    modalities_in_study: list[str]
    number_of_series: int
    number_of_instances: int
    size_bytes: int
    availability: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    created_at: datetime
    updated_at: datetime
    last_received_at: datetime | None


class SeriesSummary(_Public):
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    series_date: str | None
    series_time: str | None
    body_part_examined: str | None
    number_of_instances: int
    size_bytes: int
    availability: str
    source_ae_title: str | None
    created_at: datetime
    last_received_at: datetime | None


class StudyDetail(StudySummary):
    institution_name: str | None
    patient_age: str | None
    sop_classes_in_study: list[str]
    last_accessed_at: datetime | None
    series: list[SeriesSummary]


class SeriesDetail(SeriesSummary):
    patient_id: str
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    station_name: str | None
    protocol_name: str | None
    sop_classes_in_series: list[str]
    # How many of its instances each storage tier holds.
    instances_by_tier: dict[str, int]


class InstanceSummary(_Public):
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    availability: str
    tier: str | None
    size: int | None
    received_at: datetime
    created_at: datetime


class InstanceLocation(_Public):
    """Where the indexed object is stored."""

    tier: str
    backend: str
    key: str
    size: int
    sha256: str
    stored_at: datetime


class InstanceDetail(InstanceSummary):
    patient_id: str
    patient_name: str | None
    modality: str | None
    content_date: str | None
    content_time: str | None
    photometric_interpretation: str | None
    bits_allocated: int | None
    source_ae_title: str | None
    content_sha256: str
    last_accessed_at: datetime | None
    location: InstanceLocation | None


class DeletionResult(_Public):
    """What a DELETE removed: index rows, and the stored objects."""

    level: Literal["study", "series", "instance"]
    study_instance_uid: str
    series_instance_uid: str | None
    sop_instance_uid: str | None
    instances_deleted: int
    objects_deleted: int
    # Left in storage (logged; the index no longer refers to them).
    objects_not_deleted: int


# -- remote nodes --------------------------------------------------------------


class EchoRequest(BaseModel):
    """Options of a C-ECHO test (the body may be omitted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Our AE title in the association (default: the gateway's, PACS_GATEWAY_AE_TITLE).
    calling_ae_title: str | None = Field(default=None, min_length=1, max_length=16)
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)


class EchoResult(_Public):
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    success: bool
    message: str
    # Association, C-ECHO and release, measured here.
    round_trip_ms: float


# -- worklist ------------------------------------------------------------------


class ScheduledStepCreate(BaseModel):
    """One Scheduled Procedure Step of an item to schedule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: str | None = Field(default=None, max_length=16)
    scheduled_station_ae_title: str | None = Field(default=None, max_length=16)
    scheduled_station_name: str | None = Field(default=None, max_length=16)
    # YYYYMMDD and HHMM[SS]
    start_date: str | None = Field(default=None, pattern=r"^\d{8}$")
    start_time: str | None = Field(default=None, pattern=r"^\d{4}(\d{2})?$")
    sps_id: str | None = Field(default=None, max_length=16)
    description: str | None = Field(default=None, max_length=64)
    performing_physician_name: str | None = Field(default=None, max_length=64)


class WorklistItemCreate(BaseModel):
    """A requested procedure to schedule: one worklist row per step.

    ``attributes`` (DICOM JSON) is the starting point when given; the named
    fields override what it says.  Missing Study Instance UID, Requested
    Procedure ID and SPS ID are generated.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    patient_id: str | None = Field(default=None, max_length=64)
    patient_name: str | None = Field(default=None, max_length=324)
    patient_birth_date: str | None = Field(default=None, pattern=r"^\d{8}$")
    patient_sex: Literal["M", "F", "O"] | None = None
    accession_number: str | None = Field(default=None, max_length=16)
    requested_procedure_id: str | None = Field(default=None, max_length=16)
    requested_procedure_description: str | None = Field(default=None, max_length=64)
    study_instance_uid: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)
    referring_physician_name: str | None = Field(default=None, max_length=324)
    steps: list[ScheduledStepCreate] = Field(default_factory=list)
    attributes: dict[str, Any] | None = None
