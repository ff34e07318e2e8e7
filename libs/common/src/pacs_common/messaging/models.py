"""Messages exchanged over RabbitMQ, defined once for every service.

Each message is JSON with a ``schema`` field naming its type and version
(``ingest/1``); a consumer refuses a schema it does not know instead of
guessing.  W3C trace context travels in the AMQP headers, not here.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


def _now() -> datetime:
    return datetime.now(UTC)


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    created_at: datetime = Field(default_factory=_now)


class StorageLocation(BaseModel):
    """Where an object is kept: what the index records per instance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier: str
    backend: str
    key: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class IngestSource(BaseModel):
    """Who sent the instance and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["dimse", "stow", "import"]
    calling_ae_title: str | None = None
    called_ae_title: str | None = None
    peer: str | None = None  # "host:port" of the sender


class IngestMessage(_Message):
    """An instance was written to storage and waits to be indexed."""

    schema_: Literal["ingest/1"] = Field(default="ingest/1", alias="schema")
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    location: StorageLocation
    source: IngestSource
    received_at: datetime = Field(default_factory=_now)


IndexOutcome = Literal["created", "unchanged", "replaced", "kept-first"]


class InstanceStored(_Message):
    """An instance is indexed and queryable (published after commit)."""

    schema_: Literal["instance.stored/1"] = Field(default="instance.stored/1", alias="schema")
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    outcome: IndexOutcome
    location: StorageLocation
    source: IngestSource


class StudyStable(_Message):
    """A study received no instance for the configured quiet period."""

    schema_: Literal["study.stable/1"] = Field(default="study.stable/1", alias="schema")
    study_instance_uid: str
    patient_id: str | None
    modalities_in_study: list[str]
    number_of_series: int
    number_of_instances: int
    last_received_at: datetime


Event = Annotated[InstanceStored | StudyStable, Field(discriminator="schema_")]


class _MppsEvent(_Message):
    """A Modality Performed Procedure Step changed state (N-CREATE / N-SET).

    Published after the new state is written and before it is committed; a
    consumer may see the same state twice (the modality retried after a
    failure answer), so it keys on ``(sop_instance_uid, status)``.
    """

    sop_instance_uid: str
    calling_ae_title: str | None
    patient_id: str | None
    accession_number: str | None
    study_instance_uid: str | None
    scheduled_procedure_step_id: str | None
    # The worklist item the step performs (None: unscheduled or not found).
    worklist_item_pk: int | None
    performed_series_uids: list[str] = Field(default_factory=list)
    modality: str | None = None
    # The step as DICOM JSON, N-SET modifications applied.
    attributes: dict[str, Any] = Field(default_factory=dict)


class MppsInProgress(_MppsEvent):
    schema_: Literal["mpps.in-progress/1"] = Field(default="mpps.in-progress/1", alias="schema")
    status: Literal["IN PROGRESS"] = "IN PROGRESS"


class MppsCompleted(_MppsEvent):
    schema_: Literal["mpps.completed/1"] = Field(default="mpps.completed/1", alias="schema")
    status: Literal["COMPLETED"] = "COMPLETED"


class MppsDiscontinued(_MppsEvent):
    schema_: Literal["mpps.discontinued/1"] = Field(default="mpps.discontinued/1", alias="schema")
    status: Literal["DISCONTINUED"] = "DISCONTINUED"


MppsEvent = MppsInProgress | MppsCompleted | MppsDiscontinued
MppsEventAdapter: TypeAdapter[MppsEvent] = TypeAdapter(Annotated[MppsEvent, Field(discriminator="schema_")])

#: Routing keys of the events topic exchange.
EVENT_ROUTING_KEYS: dict[type[BaseModel], str] = {
    InstanceStored: "instance.stored",
    StudyStable: "study.stable",
    MppsInProgress: "mpps.in-progress",
    MppsCompleted: "mpps.completed",
    MppsDiscontinued: "mpps.discontinued",
}

_ingest_adapter: TypeAdapter[IngestMessage] = TypeAdapter(IngestMessage)


def encode(message: _Message) -> bytes:
    return message.model_dump_json(by_alias=True).encode()


def decode_mpps_event(body: bytes) -> MppsEvent:
    """Parse an MPPS event; raises pydantic.ValidationError on anything else."""
    return MppsEventAdapter.validate_json(body)


def decode_ingest(body: bytes) -> IngestMessage:
    """Parse an ingest message; raises pydantic.ValidationError on anything else."""
    return _ingest_adapter.validate_json(body)
