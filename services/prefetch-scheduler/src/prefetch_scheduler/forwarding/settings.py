"""Settings of the forwarder (``PACS_FORWARD_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ForwardSettings"]


class ForwardSettings(BaseSettings):
    """How the forwarder consumes events and sends instances."""

    model_config = SettingsConfigDict(env_prefix="PACS_FORWARD_", extra="ignore")

    # Off: no event consumer and no sender run in this process.
    enabled: bool = True
    # Our calling AE title on the associations we open.
    ae_title: str = Field(default="PACS", min_length=1, max_length=16)
    # Instances claimed (and sent over one association) at a time.
    batch_size: int = Field(default=50, ge=1, le=1000)
    # How often due items are looked for when there is nothing to do.
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    # Retry delay after the n-th failed attempt: base * 2**(n-1), at most
    # max, with jitter (a random 50-100 % of it).
    retry_base_delay_seconds: float = Field(default=5.0, gt=0)
    retry_max_delay_seconds: float = Field(default=600.0, gt=0)
    # Attempts per instance before it is failed for good.
    max_attempts: int = Field(default=10, ge=1)
    # Associations open at once to one destination, over every replica.
    concurrency_per_destination: int = Field(default=2, ge=1, le=64)
    # Associations open at once from this process, whatever the destination.
    max_associations: int = Field(default=8, ge=1, le=256)
    # A claim not finished in this time (a replica that died) is queued again.
    lease_seconds: float = Field(default=900.0, gt=0)
    # pynetdicom timeouts.
    connection_timeout_seconds: float = Field(default=10.0, gt=0)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=120.0, gt=0)
    network_timeout_seconds: float = Field(default=120.0, gt=0)
    # Events buffered by the consumer; an event whose handling keeps failing
    # is dropped (logged and counted) after this many deliveries.
    event_prefetch: int = Field(default=32, ge=1, le=1000)
    # Events handled at once (each in its own transaction, holding a pool connection).
    event_concurrency: int = Field(default=4, ge=1, le=256)
    max_event_deliveries: int = Field(default=20, ge=1)
    # Finished (done / failed) items are deleted this long after they finished;
    # until then they keep a redelivered event from sending an instance again.
    retention_days: float = Field(default=30.0, gt=0)
    # Where instances from object storage are spooled while they are sent
    # (the system's temporary directory when unset).
    spool_dir: Path | None = None
    # TLS towards nodes marked `tls`.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip(" ")
        if not value or "\\" in value or any(not 0x20 <= ord(c) <= 0x7E for c in value):
            raise ValueError("an AE title has 1 to 16 printable ASCII characters other than backslash")
        return value

    @model_validator(mode="after")
    def _delays(self) -> ForwardSettings:
        if self.retry_max_delay_seconds < self.retry_base_delay_seconds:
            raise ValueError("PACS_FORWARD_RETRY_MAX_DELAY_SECONDS is below the base delay")
        return self
