"""Settings of PACS-to-PACS sync (``PACS_SYNC_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SyncSettings"]


class SyncSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_SYNC_", extra="ignore", populate_by_name=True)

    # Off: no relation runs in this process.
    enabled: bool = True
    # Where a remote sends what we pull (C-MOVE destination): our gateway's AE title.
    move_destination: str = Field(
        default="PACS",
        min_length=1,
        max_length=16,
        validation_alias=AliasChoices("PACS_SYNC_MOVE_DESTINATION", "PACS_GATEWAY_AE_TITLE"),
    )
    # Our calling AE title on the associations we open (default: the move destination).
    calling_ae_title: str | None = Field(default=None, min_length=1, max_length=16)
    # How often due relations are looked for.
    poll_interval_seconds: float = Field(default=5.0, gt=0)
    # A continuous relation runs again this long after a run ends.
    continuous_pause_seconds: float = Field(default=30.0, ge=0)
    # A run not renewed in this time (its replica died) is failed by the next claim.
    lease_seconds: float = Field(default=300.0, gt=0)
    # Instances sent over one association when pushing.
    push_batch_size: int = Field(default=50, ge=1, le=1000)
    # SOP Instance UIDs per IMAGE-level C-MOVE.
    move_batch_size: int = Field(default=100, ge=1, le=1000)
    # pynetdicom timeouts.
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    find_timeout_seconds: float = Field(default=60.0, gt=0)
    move_timeout_seconds: float = Field(default=600.0, gt=0)
    store_timeout_seconds: float = Field(default=120.0, gt=0)
    # Where stored objects are spooled while pushed (the system's temporary directory when unset).
    spool_dir: Path | None = None
    # TLS towards nodes marked `tls`.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def calling_ae(self) -> str:
        return self.calling_ae_title or self.move_destination
