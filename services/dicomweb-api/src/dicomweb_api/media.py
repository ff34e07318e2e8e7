"""Conditional requests for the retrieval resources (instances, metadata,
frames, bulk data, rendered images): strong ETags, ``If-None-Match`` and the
304 answer.

``Accept`` parsing is :mod:`dicomweb_api.accept`, multipart bodies are
:mod:`dicomweb_api.multipart`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fastapi import Response

from dicomweb_api.urls import CORP_HEADERS

__all__ = ["conditional_headers", "etag", "etag_for", "if_none_match_hits", "not_modified"]


def etag(parts: Iterable[str]) -> str:
    """A strong ETag over ``parts`` (content hashes and whatever else shapes the body)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\n")
    return f'"{digest.hexdigest()[:40]}"'


def etag_for(content_sha256: str, *aspects: object) -> str:
    """The ETag of one representation of an instance's content: the stored
    object's digest plus whatever shapes the response (frames, media type,
    window...)."""
    return etag([content_sha256, *(repr(aspect) for aspect in aspects)])


def if_none_match_hits(header: str | None, current: str) -> bool:
    """Whether ``If-None-Match`` names ``current`` (or is ``*``); weak tags
    compare equal (RFC 9110 13.1.2)."""
    if not header:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == current.removeprefix("W/"):
            return True
    return False


def conditional_headers(tag: str) -> dict[str, str]:
    """Headers of every pixel / bulk data response: its ETag, and the
    cross-origin policy that lets a viewer on another origin (OHIF) use it."""
    return {"ETag": tag, **CORP_HEADERS, "Vary": "Accept", "Cache-Control": "private, no-cache"}


def not_modified(tag: str) -> Response:
    """The 304 answer to a request whose ``If-None-Match`` names ``tag``."""
    return Response(status_code=304, headers=conditional_headers(tag))
