"""Settings of the prior-study prefetch (``PACS_PREFETCH_*``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["PrefetchSettings"]

_DAYS_PER_YEAR = 365


def _ae_title(value: str) -> str:
    value = value.strip(" ")
    if not 1 <= len(value) <= 16 or "\\" in value:
        raise ValueError(f"{value!r} is not an AE title (1 to 16 characters, no backslash)")
    return value


class PrefetchSettings(BaseSettings):
    """Where priors come from, which ones, when, and how gently."""

    model_config = SettingsConfigDict(env_prefix="PACS_PREFETCH_", extra="ignore", populate_by_name=True)

    # The remote PACS to query, by AE title (nodes of the registry, `pacs node add`),
    # comma-separated; queried in this order, the first that has a study moves it.
    sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Where the remote PACS sends the priors: our gateway's AE title.
    move_destination: str = Field(
        default="PACS",
        validation_alias=AliasChoices("PACS_PREFETCH_MOVE_DESTINATION", "PACS_GATEWAY_AE_TITLE"),
    )
    # Our AE title in the associations we open (default: the move destination).
    calling_ae_title: str | None = None

    # -- which priors --------------------------------------------------------
    # Only studies at most this old (years + days; both 0: no limit).
    lookback_years: int = Field(default=5, ge=0)
    lookback_days: int = Field(default=0, ge=0)
    max_studies: int = Field(default=3, ge=1)
    prefer_same_modality: bool = True
    prefer_same_body_part: bool = True

    # -- when ----------------------------------------------------------------
    # A new worklist item is handled at once (within this long of its creation)…
    on_create: bool = True
    created_within_hours: float = Field(default=24.0, gt=0)
    # …and an older one once its scheduled start is at most this far ahead,
    lead_time_hours: float = Field(default=24.0, ge=0)
    # unless that start is more than this long past.
    past_grace_hours: float = Field(default=12.0, ge=0)
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    # Jobs one replica runs at once.
    max_concurrent_jobs: int = Field(default=4, ge=1)

    # -- how gently, per remote PACS (across all replicas) ---------------------
    remote_max_associations: int = Field(default=2, ge=1)
    remote_min_move_interval_seconds: float = Field(default=0.5, ge=0)

    # -- retries ---------------------------------------------------------------
    retry_base_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    # A running job whose worker has not reported for this long is taken over.
    stale_after_seconds: float = Field(default=300.0, gt=0)

    # -- DICOM -----------------------------------------------------------------
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    find_timeout_seconds: float = Field(default=30.0, gt=0)
    # Longest wait for the next C-MOVE response (Orthanc answers at the end).
    move_timeout_seconds: float = Field(default=600.0, gt=0)
    # After a move, wait this long at most until the index holds the study.
    index_wait_seconds: float = Field(default=60.0, ge=0)
    # TLS to nodes marked tls in the registry.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # -- HTTP (health, metrics) ------------------------------------------------
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8084, ge=0, le=65535)

    @field_validator("sources", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part for part in (p.strip() for p in text.split(",")) if part]
        return value

    @field_validator("sources")
    @classmethod
    def _ae_titles(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(_ae_title(v) for v in value))

    @field_validator("move_destination")
    @classmethod
    def _destination(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @model_validator(mode="after")
    def _retry_bounds(self) -> PrefetchSettings:
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("PACS_PREFETCH_RETRY_MAX_SECONDS must be >= PACS_PREFETCH_RETRY_BASE_SECONDS")
        return self

    @property
    def calling_ae(self) -> str:
        return self.calling_ae_title or self.move_destination

    @property
    def lookback(self) -> timedelta | None:
        days = self.lookback_years * _DAYS_PER_YEAR + self.lookback_days
        return timedelta(days=days) if days else None
