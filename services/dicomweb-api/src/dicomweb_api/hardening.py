"""HTTP hardening of the dicomweb-api, as two plain ASGI middlewares (they
never buffer or reorder a streamed response).

* :class:`SecurityHeaders`: ``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``, a
  Content-Security-Policy that allows nothing (API responses are data, never
  pages; the OpenAPI pages under ``/docs`` keep working without it),
  ``Strict-Transport-Security`` when the request came over HTTPS (the scheme,
  or ``X-Forwarded-Proto: https`` from the ingress) or the settings say
  always, and a ``Cache-Control`` where a route set none: ``private,
  no-cache`` beside an ETag (revalidate), ``no-store`` otherwise (PHI must
  not sit in shared caches).  Headers a route set itself are kept.
* :class:`JsonBodyLimit`: JSON request bodies under ``/api/v1`` are read
  up to a limit before the route sees them; a larger one (declared or
  streamed) is answered 413 with a reason.  STOW-RS bodies have their own,
  streaming limit (``max_stow_request_bytes``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["JsonBodyLimit", "SecurityHeaders"]

API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_DOCS_PATHS: Final = ("/docs", "/redoc", "/openapi.json")


def _is_https(scope: Scope) -> bool:
    if scope.get("scheme") in ("https", "wss"):
        return True
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-proto":
            return bool(value.split(b",")[0].strip().lower() == b"https")
    return False


class SecurityHeaders:
    """Adds the security headers to every HTTP response (see the module)."""

    def __init__(self, app: ASGIApp, *, hsts_max_age_seconds: int, hsts_always: bool = False) -> None:
        self.app = app
        self._hsts = f"max-age={hsts_max_age_seconds}; includeSubDomains"
        self._hsts_always = hsts_always

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        docs = path.startswith(_DOCS_PATHS)
        hsts = self._hsts_always or _is_https(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if not docs:
                    headers.setdefault("Content-Security-Policy", API_CSP)
                if hsts:
                    headers.setdefault("Strict-Transport-Security", self._hsts)
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "private, no-cache" if "etag" in headers else "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class JsonBodyLimit:
    """Refuses JSON request bodies larger than ``max_bytes`` under the path
    prefixes given, with 413 and ``{"detail": reason}``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, path_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self._max = max_bytes
        self._prefixes = path_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self._prefixes):
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        if not _is_json(_header(headers, b"content-type")):
            await self.app(scope, receive, send)
            return
        declared = _header(headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            await self._too_large(
                send, f"the request body ({int(declared)} bytes) is larger than {self._max} bytes"
            )
            return
        # Read the (small) body here, counting as it streams; replay it to the route.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body: bytes = message.get("body", b"")
            size += len(body)
            if size > self._max:
                await self._too_large(send, f"the request body is larger than {self._max} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(send: Send, reason: str) -> None:
        body = json.dumps({"detail": reason}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
