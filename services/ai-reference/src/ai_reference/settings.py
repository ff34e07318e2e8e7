"""Settings of the reference inference service (``AI_REFERENCE_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ReferenceSettings"]


class ReferenceSettings(BaseSettings):
    """How the reference service listens and what it computes."""

    model_config = SettingsConfigDict(env_prefix="AI_REFERENCE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    # Voxels at or above this many Hounsfield units are segmented.
    threshold_hu: float = 300.0
    segment_label: str = Field(default="Bone", min_length=1, max_length=64)
    # Fetching the study over WADO-RS.
    fetch_timeout_seconds: float = Field(default=60.0, gt=0)
    # A series with more images than this is refused (413), not loaded.
    max_images_per_series: int = Field(default=2000, ge=1)
    # Answer 202 and deliver the results to the request's callback URL later
    # (when the request has one); otherwise answer synchronously.
    asynchronous: bool = False
    log_level: str = "INFO"
