"""The request the connector sends to an inference endpoint (CONTRACT.md)."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "REQUEST_SCHEMA",
    "Auth",
    "Callback",
    "DicomwebLocation",
    "InferenceRequest",
    "InstanceRef",
    "SeriesRef",
]

REQUEST_SCHEMA: Final = "pacs.ai.request/1"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class InstanceRef(_Model):
    sop_class_uid: str
    sop_instance_uid: str
    instance_url: str


class SeriesRef(_Model):
    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_url: str
    instances: list[InstanceRef]


class DicomwebLocation(_Model):
    base_url: str
    study_url: str


class Auth(_Model):
    type: Literal["bearer"] = "bearer"
    token: str


class Callback(_Model):
    url: str
    # The endpoint sends it back as ``Authorization: Bearer …`` with the results.
    token: str


class InferenceRequest(_Model):
    schema_: str = Field(default=REQUEST_SCHEMA, alias="schema")
    job_id: str
    rule: str
    study_instance_uid: str
    patient_id: str | None
    series: list[SeriesRef]
    dicomweb: DicomwebLocation
    auth: Auth | None
    callback: Callback | None
