"""Settings of the dicomweb-api (``PACS_DICOMWEB_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DicomwebSettings(BaseSettings):
    """The DICOMweb and management HTTP service."""

    model_config = SettingsConfigDict(env_prefix="PACS_DICOMWEB_", extra="ignore")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # The query-service (QIDO-RS, and the instance lists of WADO-RS).
    query_url: str = "http://127.0.0.1:8083"
    query_timeout_seconds: float = Field(default=30.0, gt=0)
    # How clients reach this service, for RetrieveURL / BulkDataURI values;
    # None: taken from each request (Host / X-Forwarded-* headers).
    public_base_url: str | None = None
    # CORS: origins allowed to call from a browser (OHIF), and the response
    # headers their scripts may read.
    cors_allowed_origins: list[str] = Field(default_factory=list)
    cors_exposed_headers: list[str] = Field(
        default_factory=lambda: ["Content-Type", "Content-Length", "Warning", "ETag", "Location"]
    )
    # STOW-RS: request bodies are spooled here part by part (never in memory).
    spool_dir: Path = Path("data/spool")
    max_stow_request_bytes: int = Field(default=4 * 1024**3, ge=1)
    # JSON request bodies of the management API (/api/v1): larger ones are 413.
    max_api_json_bytes: int = Field(default=1024**2, ge=1)
    # Strict-Transport-Security: sent on requests that came over HTTPS (the
    # scheme, or X-Forwarded-Proto from the ingress); always, with hsts_always.
    hsts_always: bool = False
    hsts_max_age_seconds: int = Field(default=31_536_000, ge=0)
