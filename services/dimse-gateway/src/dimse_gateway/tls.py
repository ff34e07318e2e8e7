"""DICOM TLS on the gateway's second port (PS3.15 Annex B, BCP 195 profile).

When a certificate and key are configured the gateway listens, next to its
plain port, on a TLS port (2762, the port IANA assigned to DICOM over TLS)
with TLS 1.2 or 1.3.  With a CA file, client certificates are verified
against it; with ``require_client_cert`` a peer without a certificate the CA
signed is refused (mutual TLS, the "node authentication" of PS3.15 B.1).

The handshake is not done where pynetdicom does it (in the listening thread,
with no timeout: one silent client would stall every TLS connection and a
failure would vanish without a trace) but in the connection's own thread,
bounded by ``handshake_timeout_seconds``; a failure is classified, logged,
counted and audited by the caller's :class:`HandshakeFailureHandler`.
"""

from __future__ import annotations

import socket
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DICOM_TLS_PORT = 2762

_MIN_VERSIONS: dict[str, ssl.TLSVersion] = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# BCP 195 (RFC 9325) TLS 1.2 suites: forward secrecy and AEAD only.  TLS 1.3
# suites are not configurable through this string and are all acceptable.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class GatewayTlsSettings(BaseSettings):
    """The gateway's TLS listener (``PACS_GATEWAY_TLS_*``)."""

    model_config = SettingsConfigDict(env_prefix="PACS_GATEWAY_TLS_", extra="ignore")

    # None: on when a certificate and key are configured.
    enabled: bool | None = None
    # None: the plain listener's host.
    host: str | None = None
    port: int = Field(default=DICOM_TLS_PORT, ge=0, le=65535)
    cert_file: Path | None = None
    key_file: Path | None = None
    # CAs that sign acceptable client certificates; without one, clients are not asked for a certificate.
    ca_file: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str = BCP195_CIPHERS
    handshake_timeout_seconds: float = Field(default=10.0, gt=0)

    @property
    def active(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return self.cert_file is not None and self.key_file is not None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.active and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS needs PACS_GATEWAY_TLS_CERT_FILE and PACS_GATEWAY_TLS_KEY_FILE")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs PACS_GATEWAY_TLS_CA_FILE (the CAs to verify against)")
        return self


def server_context(settings: GatewayTlsSettings) -> ssl.SSLContext:
    """The listening side's context; fails fast on unreadable files."""
    if settings.cert_file is None or settings.key_file is None:
        raise ValueError("a TLS listener needs a certificate and a key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSIONS[settings.min_version]
    context.set_ciphers(settings.ciphers)
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class HandshakeFailure(StrEnum):
    """Why a TLS handshake failed (the metric's ``reason`` label)."""

    TIMEOUT = "timeout"
    CERTIFICATE = "certificate"  # no client certificate, or one the CA did not sign
    PROTOCOL = "protocol"  # not TLS, an old version, no common cipher
    CLOSED = "closed"  # the peer went away


def classify(exc: BaseException) -> HandshakeFailure:
    if isinstance(exc, TimeoutError | socket.timeout):
        return HandshakeFailure.TIMEOUT
    if isinstance(exc, ssl.SSLCertVerificationError):
        return HandshakeFailure.CERTIFICATE
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        if "CERTIFICATE" in text:
            return HandshakeFailure.CERTIFICATE
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return HandshakeFailure.CLOSED
        return HandshakeFailure.PROTOCOL
    return HandshakeFailure.CLOSED


class HandshakeFailureHandler(Protocol):
    """Told of every failed handshake (peer address, reason, detail)."""

    def __call__(self, address: str, reason: HandshakeFailure, detail: str) -> None: ...


def wrap_accepted(context: ssl.SSLContext, client: socket.socket) -> ssl.SSLSocket:
    """Wrap an accepted socket without handshaking (see :func:`complete_handshake`)."""
    return context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)


def complete_handshake(sock: ssl.SSLSocket, timeout_seconds: float) -> None:
    """Run the server handshake, bounded; raises what the handshake raised.

    The socket is left blocking as pynetdicom expects (it polls with select)."""
    sock.settimeout(timeout_seconds)
    try:
        sock.do_handshake()
    finally:
        sock.settimeout(None)


def peer_subject(sock: ssl.SSLSocket) -> str | None:
    """The verified client certificate's subject, as ``CN=...,O=...`` (None: none sent)."""
    cert = sock.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    parts = [f"{key}={value}" for rdn in subject for key, value in rdn]
    return ",".join(parts) or None
