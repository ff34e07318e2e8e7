"""Settings of restores (``PACS_RESTORE_*``) and last-access recording (``PACS_ACCESS_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AccessSettings", "RestoreSettings"]


class RestoreSettings(BaseSettings):
    """How archived objects are brought back online."""

    model_config = SettingsConfigDict(env_prefix="PACS_RESTORE_", extra="ignore")

    # S3: how long the restored copy stays readable, and the retrieval tier.
    days: int = Field(default=7, ge=1)
    s3_tier: Literal["Bulk", "Standard", "Expedited"] = "Standard"
    # Azure: the online tier an Archive blob is rehydrated to, and the priority.
    azure_tier: Literal["Hot", "Cool", "Cold"] = "Hot"
    azure_priority: Literal["Standard", "High"] = "Standard"
    # A restore not readable after this long fails (S3 Bulk takes up to 48 h).
    timeout_seconds: float = Field(default=72 * 3600.0, gt=0)
    # A pending restore is checked again after this long.
    check_interval_seconds: float = Field(default=60.0, ge=0)
    # Restore jobs one run_once takes at most.
    batch_size: int = Field(default=50, ge=1)
    # What readers tell clients to wait before asking again (HTTP Retry-After).
    retry_after_seconds: int = Field(default=300, ge=1)


class AccessSettings(BaseSettings):
    """Recording of last access (WADO-RS, C-MOVE, C-GET)."""

    model_config = SettingsConfigDict(env_prefix="PACS_ACCESS_", extra="ignore")

    enabled: bool = True
    # Accesses are coalesced in memory and written this often.
    flush_interval_seconds: float = Field(default=5.0, gt=0)
    # Instances kept in memory at most before a flush is forced early.
    max_pending: int = Field(default=50_000, ge=1)
