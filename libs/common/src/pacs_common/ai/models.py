"""The AI rule and request models shared by the REST API and the ai-connector."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["AiRequest", "AiRequestState", "AiRule", "AiRuleCreate", "SeriesFacts"]

_UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"
# Header names we set ourselves; a rule cannot override them.
_RESERVED_HEADERS: Final = frozenset({"content-type", "content-length", "host", "authorization"})


class AiRequestState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """What a rule looks at in one series of a stable study (from the index)."""

    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    sop_class_uids: frozenset[str]


class AiRuleCreate(BaseModel):
    """A rule to add, or the new content of one (PUT replaces it).

    The condition is evaluated per series: a series matches when its
    modality, Body Part Examined (case-insensitive) and one of its SOP
    classes equal the rule's; a part left out (None) matches anything.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    enabled: bool = True
    modality: str | None = Field(default=None, pattern=r"^[A-Z0-9_ ]{1,16}$")
    body_part_examined: str | None = Field(default=None, min_length=1, max_length=64)
    sop_class_uid: str | None = Field(default=None, pattern=_UID_PATTERN, max_length=64)
    endpoint_url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
    # One HTTP call (the synchronous answer, or the wait for the callback).
    timeout_seconds: float = Field(default=300.0, gt=0, le=86_400)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Extra headers sent to the endpoint (not secrets: see secret_ref).
    headers: dict[str, str] = Field(default_factory=dict, max_length=32)
    # Name of an environment variable of the connector whose value is sent
    # to the endpoint as ``Authorization: Bearer …``; the secret itself is
    # never stored in the database.
    secret_ref: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]{0,127}$")
    description: str | None = Field(default=None, max_length=1024)

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header_value in value.items():
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the connector")
            if "\r" in header_value or "\n" in header_value:
                raise ValueError(f"header {name!r}: line breaks are not allowed")
        return value

    @field_validator("body_part_examined")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return None if value is None else value.strip().upper()


class AiRule(AiRuleCreate):
    id: int
    created_at: datetime
    updated_at: datetime

    def matches(self, series: SeriesFacts) -> bool:
        """Whether ``series`` meets the condition (enabled or not)."""
        if self.modality is not None and self.modality != (series.modality or "").strip().upper():
            return False
        if (
            self.body_part_examined is not None
            and self.body_part_examined != (series.body_part_examined or "").strip().upper()
        ):
            return False
        return self.sop_class_uid is None or self.sop_class_uid in series.sop_class_uids


class AiRequest(BaseModel):
    """One analysis of a study by a rule's endpoint."""

    model_config = ConfigDict(frozen=True)

    id: int
    rule_id: int
    rule_name: str
    study_instance_uid: str
    job_id: int | None
    state: AiRequestState
    attempts: int
    next_attempt_at: datetime
    error: str | None
    # The series the rule matched (what the endpoint is asked to analyse).
    series_instance_uids: list[str]
    result_sop_instance_uids: list[str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
