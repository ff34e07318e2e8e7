"""Settings of the PACS, one pydantic-settings class per concern.

Every value comes from an environment variable with the ``PACS_`` prefix (for
example ``PACS_DB_URL``); the defaults run against PostgreSQL and RabbitMQ on
127.0.0.1 and filesystem storage under ``./data``.  Each service builds only
the classes it needs, in its ``main``; nothing here is instantiated at import.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class DatabaseSettings(BaseSettings):
    """The PostgreSQL index."""

    model_config = SettingsConfigDict(env_prefix="PACS_DB_", extra="ignore")

    url: str = "postgresql://postgres@127.0.0.1:5432/pacs"
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    command_timeout_seconds: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _postgres_only(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("PACS_DB_URL must be a postgresql:// URL")
        return value


class BrokerSettings(BaseSettings):
    """RabbitMQ."""

    model_config = SettingsConfigDict(env_prefix="PACS_AMQP_", extra="ignore")

    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # Prefix of every exchange and queue name; lets several systems (or test
    # sessions) share one broker without seeing each other's messages.
    namespace: str = ""
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    # After losing the broker, try again this often (aio-pika's default is 5 s).
    reconnect_interval_seconds: float = Field(default=1.0, gt=0)
    # Delays of the retry queues, one queue per attempt; a message that has
    # failed once per delay goes to the dead-letter queue.
    retry_delays_ms: list[int] = Field(default=[1_000, 10_000, 60_000], min_length=1)
    # Optional hard cap of the ingest queue (x-max-length, x-overflow
    # reject-publish): a publish into a full queue is nacked and the receiver
    # answers failure.  Receivers already refuse new work at
    # PACS_BACKPRESSURE_MAX_INGEST_BACKLOG, which bounds the queue; set this
    # when installing, because RabbitMQ refuses to re-declare an existing
    # queue with a different cap (it would have to be drained and deleted).
    ingest_queue_max_length: int | None = Field(default=None, ge=1)


class StorageBackendKind(StrEnum):
    FILESYSTEM = "filesystem"
    S3 = "s3"
    AZURE = "azure"


class StorageTiersSettings(BaseSettings):
    """Which storage tiers the deployment has (``PACS_STORAGE_TIERS``).

    ``hot,warm,cold`` (or a JSON list): each is configured by its own
    ``PACS_STORAGE_<TIER>_*`` variables.  Receivers write to ``hot``; every
    reader opens all of them, because the index may point an instance at any.
    """

    model_config = SettingsConfigDict(env_prefix="PACS_STORAGE_", extra="ignore")

    tiers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["hot"], min_length=1)

    @field_validator("tiers", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("tiers")
    @classmethod
    def _hot_first(cls, value: list[str]) -> list[str]:
        names = list(dict.fromkeys(name.lower() for name in value))
        for name in names:
            if not name.isidentifier():
                raise ValueError(f"storage tier name {name!r}: letters, digits and _ only")
        if "hot" not in names:
            raise ValueError("PACS_STORAGE_TIERS must include hot (receivers write there)")
        return ["hot", *(name for name in names if name != "hot")]


class StorageTierSettings(BaseSettings):
    """One storage tier (hot, warm, cold): which backend and where.

    Built per tier with ``StorageTierSettings.for_tier("hot")``, which reads
    ``PACS_STORAGE_HOT_*``.
    """

    model_config = SettingsConfigDict(env_prefix="PACS_STORAGE_HOT_", extra="ignore")

    backend: StorageBackendKind = StorageBackendKind.FILESYSTEM
    # filesystem
    path: Path = Path("data/hot")
    fsync: bool = True
    # s3
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "pacs"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_storage_class: str | None = None
    # azure
    azure_connection_string: SecretStr | None = None
    azure_container: str = "pacs"
    azure_access_tier: str | None = None
    # common
    prefix: str = ""
    multipart_threshold_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)

    @classmethod
    def for_tier(cls, tier: str) -> StorageTierSettings:
        return cls(_env_prefix=f"PACS_STORAGE_{tier.upper()}_")


class TelemetrySettings(BaseSettings):
    """Logging, metrics and tracing."""

    model_config = SettingsConfigDict(env_prefix="PACS_TELEMETRY_", extra="ignore")

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces; none = no export.
    otlp_endpoint: str | None = None
    # Share of new traces recorded (1.0 = all); spans continuing a caller's
    # trace follow the caller's decision.
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_instance: str | None = None


class DuplicatePolicy(StrEnum):
    """What the index does when a *different* object arrives under a SOP
    Instance UID it already holds (an identical one changes nothing)."""

    KEEP_FIRST = "keep-first"  # the archived original stays; the newcomer is logged and kept aside
    REPLACE = "replace"  # the newest object becomes the indexed one; the old one is kept aside


class GatewaySettings(BaseSettings):
    """The DIMSE gateway."""

    model_config = SettingsConfigDict(env_prefix="PACS_GATEWAY_", extra="ignore")

    ae_title: str = Field(default="PACS", min_length=1, max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8081, ge=0, le=65535)
    max_associations: int = Field(default=50, ge=1)
    max_pdu_bytes: int = Field(default=262_144, ge=0)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    # Reject associations whose Called AE Title is not ours.
    require_called_ae_title: bool = True
    # When non-empty, only these Calling AE Titles may associate.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    # Directory for received datasets before they reach storage; put it on the
    # same filesystem as a filesystem hot tier so storing is a link, not a copy.
    spool_dir: Path = Path("data/spool")
    reuse_port: bool = True
    # The query-service, for C-FIND, MWL and the instance lists of C-MOVE/C-GET.
    query_url: str = "http://127.0.0.1:8083"
    query_timeout_seconds: float = Field(default=30.0, gt=0)
    # C-MOVE / C-GET sub-operations: how long to wait for a peer.
    retrieve_connect_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("AE title must not be blank")
        return value


class WorkerSettings(BaseSettings):
    """The ingest worker."""

    model_config = SettingsConfigDict(env_prefix="PACS_WORKER_", extra="ignore")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8082, ge=0, le=65535)
    prefetch: int = Field(default=200, ge=1)
    batch_size: int = Field(default=100, ge=1)
    batch_wait_ms: int = Field(default=20, ge=0)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    # A study that received no instance for this long is announced as study.stable.
    study_stable_seconds: float = Field(default=60.0, gt=0)
    stable_check_interval_seconds: float = Field(default=5.0, gt=0)
    # Elements whose value is longer than this go to the metadata as BulkDataURI.
    bulk_data_threshold_bytes: int = Field(default=1024, ge=0)


class QuerySettings(BaseSettings):
    """The query service."""

    model_config = SettingsConfigDict(env_prefix="PACS_QUERY_", extra="ignore")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8083, ge=0, le=65535)
    # A query matching more than this returns this many and says it was cut
    # (C-FIND: final status A700 after the pending responses; QIDO: Warning).
    max_matches: int = Field(default=5000, ge=1)
    # Person names match case-insensitively unless a request asks otherwise.
    pn_case_insensitive: bool = True
    # Matches are fetched from PostgreSQL in pages of this many rows.
    fetch_size: int = Field(default=200, ge=1)
