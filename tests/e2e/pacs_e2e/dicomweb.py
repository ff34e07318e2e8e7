"""Talking DICOMweb to the running system: API tokens made with the
service's own bootstrap command, an OIDC issuer of our own (a JWKS served
over HTTP, JWTs signed locally), authenticated dicomweb-client instances and
a small multipart/related reader and writer for raw requests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from dicomweb_client.api import DICOMwebClient
from jwt.algorithms import RSAAlgorithm

from pacs_common.localrun.runner import LocalSystem

JWKS_PATH = "/jwks.json"


def security_cli(system: LocalSystem, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dicomweb_api.security.cli ...`` against ``system``'s database."""
    return subprocess.run(
        [sys.executable, "-m", "dicomweb_api.security.cli", *args],
        env={**os.environ, **system.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create_api_token(system: LocalSystem, username: str, role: str) -> str:
    """A user with ``role`` and an API token for it (the secret)."""
    made = security_cli(system, "user", "create", "--username", username, "--role", role)
    if made.returncode != 0:
        raise RuntimeError(f"cannot create user {username}: {made.stderr}")
    token = security_cli(system, "token", "create", "--user", username, "--name", "e2e")
    if token.returncode != 0:
        raise RuntimeError(f"cannot create a token for {username}: {token.stderr}")
    return token.stdout.strip()


def bearer_session(token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def web_client(base_url: str, token: str) -> DICOMwebClient:
    """dicomweb-client for ``{base_url}/dicom-web`` sending ``token``."""
    return DICOMwebClient(url=f"{base_url}/dicom-web", session=bearer_session(token))


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class OidcIssuer:
    """An OIDC issuer reduced to what the service uses: a JWKS at
    ``{url}/jwks.json`` and RS256 tokens signed with its key."""

    def __init__(self, audience: str) -> None:
        self.audience = audience
        self.kid = uuid.uuid4().hex[:12]
        self._key = _rsa_key()
        public_jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        jwks = json.dumps({"keys": [{**public_jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != JWKS_PATH:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(jwks)))
                self.end_headers()
                self.wfile.write(jwks)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OidcIssuer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def settings(self) -> dict[str, str]:
        """The ``PACS_AUTH_OIDC_*`` variables pointing the service at this issuer."""
        return {
            "PACS_AUTH_OIDC_ISSUER": self.url,
            "PACS_AUTH_OIDC_JWKS_URL": self.url + JWKS_PATH,
            "PACS_AUTH_OIDC_AUDIENCE": self.audience,
        }

    def token(
        self,
        roles: Iterable[str],
        *,
        expires_in: float = 300,
        subject: str = "e2e-user",
        signing_key: rsa.RSAPrivateKey | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed access token; ``signing_key`` forges one under this issuer's key id."""
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": self.audience,
            "sub": subject,
            "preferred_username": subject,
            "iat": now,
            "exp": now + int(expires_in),
            "roles": list(roles),
            **(extra or {}),
        }
        return jwt.encode(claims, signing_key or self._key, algorithm="RS256", headers={"kid": self.kid})

    def forged_token(self, roles: Iterable[str]) -> str:
        """Claims this issuer would sign, signed with another key under its key id."""
        return self.token(roles, signing_key=_rsa_key())


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def boundary_of(content_type: str) -> str:
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise ValueError(f"no boundary in {content_type!r}")
    return found.group(1)


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """The parts of a ``multipart/related`` body (RFC 2046), with lower-cased header names."""
    delimiter = b"--" + boundary_of(content_type).encode("ascii")
    chunks = body.split(b"\r\n" + delimiter)
    first = chunks[0]
    if not first.startswith(delimiter):
        raise ValueError("the body does not start with the boundary")
    chunks[0] = first[len(delimiter) :]
    parts: list[Part] = []
    for chunk in chunks:
        if chunk.startswith(b"--"):
            break
        head, separator, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a part without a header/body separator")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, payload))
    else:
        raise ValueError("the body has no closing boundary")
    return parts


def multipart_body(parts: Iterable[tuple[str, bytes]], boundary: str) -> bytes:
    """A ``multipart/related`` body of (content type, bytes) parts."""
    out = bytearray()
    for content_type, payload in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")
        out += payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return bytes(out)
