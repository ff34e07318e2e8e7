"""Settings of the hsm-migrator (``PACS_HSM_*``) and its policy rules.

Rules are a JSON list in ``PACS_HSM_RULES``, for example::

    [{"from_tier": "hot", "to_tier": "warm", "min_study_age_days": 30},
     {"from_tier": "hot", "to_tier": "warm", "min_study_age_days": 365, "modalities": ["MG"]},
     {"from_tier": "warm", "to_tier": "cold", "not_accessed_days": 180}]

A rule moves an instance from ``from_tier`` to ``to_tier`` when its study is
at least ``min_study_age_days`` old (by StudyDate, or when it was received
if the study has no valid StudyDate) and/or it was not accessed for
``not_accessed_days`` (the last WADO / C-MOVE / C-GET of the instance or
its study, or when it was received if never).  Both given: both must hold.

A rule with ``modalities`` applies to series of those modalities only and
*overrides*, for them, the rules without modalities that leave the same
tier: in the example, mammograms stay hot for a year, everything else a
month.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["HsmSettings", "MigrationRule"]


class MigrationRule(BaseModel):
    """One policy rule: which instances leave ``from_tier`` for ``to_tier``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    from_tier: str = Field(min_length=1)
    to_tier: str = Field(min_length=1)
    min_study_age_days: int | None = Field(default=None, ge=0)
    not_accessed_days: int | None = Field(default=None, ge=0)
    # Upper-case modality codes (CT, MR, MG…); None = the rule for every other modality.
    modalities: tuple[str, ...] | None = None

    @field_validator("from_tier", "to_tier")
    @classmethod
    def _tier_name(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        cleaned = tuple(dict.fromkeys(m.strip().upper() for m in value if m.strip()))
        if not cleaned:
            raise ValueError("modalities: give at least one, or leave it out")
        return cleaned

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.from_tier == self.to_tier:
            raise ValueError(f"a rule must move between two tiers ({self.from_tier} → {self.to_tier})")
        if self.min_study_age_days is None and self.not_accessed_days is None:
            raise ValueError("a rule needs min_study_age_days and/or not_accessed_days")
        return self


class HsmSettings(BaseSettings):
    """The hsm-migrator service."""

    model_config = SettingsConfigDict(env_prefix="PACS_HSM_", extra="ignore")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8085, ge=0, le=65535)
    # A policy pass (and a pass of restores) this often.
    interval_seconds: float = Field(default=300.0, gt=0)
    # Queued migration jobs are looked for this often.
    job_poll_seconds: float = Field(default=2.0, gt=0)
    # Instances claimed per database round trip.
    batch_size: int = Field(default=50, ge=1)
    # Objects copied at once.
    concurrency: int = Field(default=4, ge=1)
    rules: list[MigrationRule] = Field(default_factory=list)
    # A move not advanced for this long (its migrator died) is taken over by any replica.
    lease_seconds: float = Field(default=300.0, gt=0)
    # A move that failed this many times is given up (its copy removed; tried again after the backoff).
    max_attempts: int = Field(default=3, ge=1)
    # After a move was given up, the instance is not tried again for this long.
    failure_backoff_seconds: float = Field(default=3600.0, ge=0)
    # A running migration job not heard of for this long (its migrator died) is queued again.
    job_stale_seconds: float = Field(default=600.0, gt=0)
    # Who the migrator is to study locks (locks of this holder do not stop it).
    lock_holder: str = "hsm-migrator"
    # Run the archive restores (pacs_common.archive.restore) in each pass.
    restores_enabled: bool = True

    @model_validator(mode="after")
    def _rules_are_unambiguous(self) -> Self:
        seen: set[tuple[str, str | None]] = set()
        for rule in self.rules:
            for modality in rule.modalities or (None,):
                key = (rule.from_tier, modality)
                if key in seen:
                    which = f"modality {modality}" if modality else "all modalities"
                    raise ValueError(f"two rules move {which} out of tier {rule.from_tier}")
                seen.add(key)
        return self

    def tiers_named(self) -> set[str]:
        """Every tier the rules mention."""
        return {t for rule in self.rules for t in (rule.from_tier, rule.to_tier)}
