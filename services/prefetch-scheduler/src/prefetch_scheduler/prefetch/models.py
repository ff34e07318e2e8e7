"""The prefetch job's parameters (``job.params`` of a ``prefetch`` job).

Whoever asks for a prefetch (the worklist scan, ``pacs prefetch``, ``POST
/api/v1/prefetch``) creates the job with at least ``patient_id``; the
scheduler adds what it learns as it goes: the priors it chose and what
became of each, the attempt count, when the next attempt is due and why the
last one failed.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PrefetchParams", "RemoteStudy", "StudyOutcome", "StudyTask", "Trigger"]

Trigger = Literal["created", "due", "on-demand"]


class StudyOutcome(StrEnum):
    PENDING = "pending"
    MOVED = "moved"
    SKIPPED_LOCAL = "skipped-local"
    FAILED = "failed"


class RemoteStudy(BaseModel):
    """A study as a remote PACS's C-FIND described it."""

    model_config = ConfigDict(frozen=True)

    study_instance_uid: str
    source: str
    study_date: str | None = None
    study_time: str | None = None
    modalities: tuple[str, ...] = ()
    description: str | None = None
    body_part: str | None = None
    accession_number: str | None = None
    # Number of Study Related Instances, when the remote says.
    instances: int | None = None


class StudyTask(RemoteStudy):
    """A chosen prior and what became of it."""

    model_config = ConfigDict(frozen=False)

    outcome: StudyOutcome = StudyOutcome.PENDING
    detail: str | None = None
    # C-MOVE sub-operations of the last move.
    moved_instances: int = 0
    failed_instances: int = 0
    moves: int = 0
    # The index held the study (as many instances as the remote has) when the job ended.
    indexed: bool | None = None


class PrefetchParams(BaseModel):
    """``job.params``; keys this model does not know are kept as they are."""

    model_config = ConfigDict(extra="allow")

    patient_id: str = Field(min_length=1, max_length=64)
    issuer_of_patient_id: str | None = None
    # One remote PACS (AE title) instead of every configured source.
    source: str | None = None
    # Prefer priors of this modality / body part (the scheduled procedure's).
    modality: str | None = None
    body_part: str | None = None
    # The scheduled study itself is no prior.
    exclude_study_uid: str | None = None
    worklist_item: int | None = None
    trigger: Trigger = "on-demand"
    # Attempts of this round (a manual retry starts a new round).
    attempt: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    # None until the remote was queried and priors were chosen.
    studies: list[StudyTask] | None = None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
