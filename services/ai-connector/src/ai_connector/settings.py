"""Settings of the ai-connector (``PACS_AI_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConnectorSettings"]


class ConnectorSettings(BaseSettings):
    """The ai-connector."""

    model_config = SettingsConfigDict(env_prefix="PACS_AI_", extra="ignore")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8086, ge=0, le=65535)
    # The dicomweb-api root (DICOMweb under /dicom-web): the URLs an
    # inference service is given to fetch the study.
    dicomweb_url: str = Field(default="http://127.0.0.1:8080", pattern=r"^https?://")
    # A bearer token (e.g. an API token of a viewer user) handed to the
    # inference service for fetching the study; none: it gets no credentials.
    dicomweb_token: SecretStr | None = None
    # Where inference services reach this connector for asynchronous results
    # (``{public_url}/v1/ai/jobs/{job_id}/results``); default: the HTTP address.
    public_url: str | None = Field(default=None, pattern=r"^https?://")
    # How often the worker looks for due requests when it has nothing to do.
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    # Requests one replica runs at once.
    concurrency: int = Field(default=4, ge=1, le=256)
    # Retry delays: base * 2^(attempt-1), at most max.
    backoff_base_seconds: float = Field(default=5.0, ge=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)
    # A running request belongs to its replica for the rule's timeout plus this
    # margin; after that another replica takes it over (the first one died).
    lease_margin_seconds: float = Field(default=30.0, ge=1)
    # On SIGTERM, running calls get this long to finish; the others are
    # interrupted and their requests handed back to any replica.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    # study.stable deliveries held unacked at once.
    prefetch: int = Field(default=16, ge=1)
    # Results are written here before they go to the hot tier.
    spool_dir: Path = Path("data/spool")
    # Largest response accepted from an inference service.
    max_result_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
