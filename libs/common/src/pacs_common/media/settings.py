"""Settings of media export and import over the REST API (``PACS_MEDIA_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MediaSettings"]


class MediaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_MEDIA_", extra="ignore")

    # A finished export is kept (for its downloads) this long, then removed.
    export_retention_seconds: float = Field(default=24 * 3600, gt=0)
    # Largest zip upload accepted by POST /imports.
    max_import_bytes: int = Field(default=8 * 1024**3, gt=0)
    # Largest uncompressed content of an imported zip (zip bombs).
    max_import_uncompressed_bytes: int = Field(default=64 * 1024**3, gt=0)
