"""The inference request of the PACS ai-connector, as this service reads it
(see ``services/ai-connector/CONTRACT.md``).  Unknown fields are ignored, so
a newer connector does not break an older service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Auth", "Callback", "DicomwebLocation", "InferenceRequest", "InstanceRef", "SeriesRef"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InstanceRef(_Model):
    sop_class_uid: str
    sop_instance_uid: str
    instance_url: str | None = None


class SeriesRef(_Model):
    series_instance_uid: str
    modality: str | None = None
    body_part_examined: str | None = None
    series_url: str
    instances: list[InstanceRef] = Field(default_factory=list)


class DicomwebLocation(_Model):
    base_url: str
    study_url: str


class Auth(_Model):
    type: Literal["bearer"] = "bearer"
    token: str


class Callback(_Model):
    url: str
    token: str


class InferenceRequest(_Model):
    schema_: str = Field(default="pacs.ai.request/1", alias="schema")
    job_id: str
    study_instance_uid: str
    patient_id: str | None = None
    series: list[SeriesRef]
    dicomweb: DicomwebLocation
    auth: Auth | None = None
    callback: Callback | None = None
