"""Settings of the workflow services (``PACS_WORKFLOW_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkflowSettings(BaseSettings):
    """Storage Commitment reporting; read by the DIMSE gateway."""

    model_config = SettingsConfigDict(env_prefix="PACS_WORKFLOW_", extra="ignore")

    # An instance a requester names may still be on its way through the
    # ingest queue: a missing one is looked for again during this long
    # before it is reported as failed.
    commitment_settle_seconds: float = Field(default=10.0, ge=0)
    commitment_poll_seconds: float = Field(default=1.0, gt=0)
    # Waits before each report attempt after the first (one attempt more than delays).
    commitment_report_retry_seconds: list[float] = Field(default=[5.0, 30.0, 120.0])
    # How long a requester has to answer an N-EVENT-REPORT, and to accept
    # the association that carries it when the request's one is gone.
    commitment_report_timeout_seconds: float = Field(default=30.0, gt=0)
    commitment_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # Concurrent commitment checks and reports.
    commitment_workers: int = Field(default=4, ge=1)
