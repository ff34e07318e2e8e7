"""``PACS_RESILIENCE_*``: retry and circuit-breaker knobs shared by every dependency."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ResilienceSettings"]


class ResilienceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACS_RESILIENCE_", extra="ignore")

    #: Attempts per call (1 = no retry) for transient failures.
    retry_max_attempts: int = Field(default=3, ge=1, le=20)
    retry_base_delay_seconds: float = Field(default=0.1, ge=0)
    retry_max_delay_seconds: float = Field(default=2.0, ge=0)
    #: Consecutive failed attempts that open a dependency's breaker.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    #: How long an open breaker fails calls fast before letting one trial through.
    breaker_reset_seconds: float = Field(default=10.0, gt=0)
