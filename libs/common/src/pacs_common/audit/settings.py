"""Settings of the audit trail (``PACS_AUDIT_*``), read by every service that audits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuditSettings(BaseSettings):
    """Where audit messages go besides PostgreSQL, and how the source is named."""

    model_config = SettingsConfigDict(env_prefix="PACS_AUDIT_", extra="ignore")

    # RFC 5424 syslog carrying the DICOM audit message XML, when a host is set.
    syslog_host: str | None = None
    syslog_port: int = Field(default=514, ge=1, le=65535)
    syslog_protocol: Literal["udp", "tcp"] = "udp"
    # AuditSourceIdentification and the syslog APP-NAME.
    source_id: str = "pacs"
    enterprise_site_id: str | None = None
    # DIMSE gateway: events waiting for the background writer; more are dropped (and counted).
    queue_size: int = Field(default=10_000, ge=1)
