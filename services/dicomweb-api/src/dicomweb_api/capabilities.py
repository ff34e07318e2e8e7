"""A machine-readable description of what this DICOMweb service supports:
``GET /dicom-web/capabilities`` and ``OPTIONS /dicom-web``.

The resource list is read from the application's OpenAPI document (every
route), so it names exactly what is served; the media types, transfer syntaxes and query
parameters are those the QIDO-RS and WADO-RS code here implements (the
transfer syntaxes instances can be converted to are probed from the
installed codecs).
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from dicomweb_api.accept import AS_STORED, DEFAULT_TRANSFER_SYNTAX, DICOM, DICOM_JSON
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.urls import CORP_HEADERS, DICOMWEB_PATH
from pacs_common.dicom.transcode import LOSSLESS_ENCODINGS, UNCOMPRESSED, can_encode

__all__ = ["add_routes", "capabilities"]

QIDO_PARAMETERS: Final = {
    "attributes": (
        "{keyword|tag|sequence.path}={value}: single value, wildcard (* ?), range (a-b), "
        "UID list (comma or backslash separated), universal (empty)"
    ),
    "includefield": "keywords or tags, repeated or comma-separated; 'all' for every attribute of the level",
    "limit": "integer >= 1",
    "offset": "integer >= 0",
    "fuzzymatching": "true | false (person names by component prefix, case-insensitive)",
}
QIDO_RESPONSE: Final = {
    "media_types": [DICOM_JSON],
    "empty_result": "200 with []",
    "truncated": "Warning: 299 header",
}
_MEDIA_TYPES: Final = {
    "qido": [DICOM_JSON],
    "retrieve": [f'multipart/related; type="{DICOM}"'],
    "metadata": [DICOM_JSON],
}


def _kind(path: str) -> str | None:
    if path.endswith("/metadata"):
        return "metadata"
    if path.endswith(("/studies", "/series", "/instances")):
        return "qido"
    if path.endswith(("/studies/{study}", "/series/{series}", "/instances/{instance}")):
        return "retrieve"
    return None


def transfer_syntaxes() -> dict[str, Any]:
    """What instances can be sent in."""
    converted = [str(uid) for uid in (*UNCOMPRESSED, *LOSSLESS_ENCODINGS) if can_encode(uid)]
    return {
        "default": DEFAULT_TRANSFER_SYNTAX,
        "as_stored": AS_STORED,
        "converted_to": converted,
        "conversion": "lossless only; 406 when an instance cannot be converted",
    }


def capabilities(openapi: dict[str, Any]) -> dict[str, Any]:
    """The description, given the app's OpenAPI document (which lists every route)."""
    listed = []
    for full_path, operations in sorted(openapi.get("paths", {}).items()):
        if not full_path.startswith(DICOMWEB_PATH):
            continue
        path = full_path.removeprefix(DICOMWEB_PATH) or "/"
        methods = sorted(method.upper() for method in operations)
        entry: dict[str, Any] = {"path": path, "methods": methods}
        kind = _kind(path)
        if kind is not None and "GET" in methods:
            entry["media_types"] = _MEDIA_TYPES[kind]
            if kind == "qido":
                entry["query_parameters"] = sorted(QIDO_PARAMETERS)
        listed.append(entry)
    return {
        "service": "dicomweb-api",
        "base_path": DICOMWEB_PATH,
        "standard": "DICOM PS3.18",
        "resources": listed,
        "qido": {"query_parameters": QIDO_PARAMETERS, "response": QIDO_RESPONSE},
        "wado": {
            "transfer_syntaxes": transfer_syntaxes(),
            "etag": "ETag on instances and metadata; If-None-Match answers 304",
            "bulk_data_uri": "{base}/dicom-web/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path}",
        },
    }


ReadPrincipal = Annotated[Principal, Depends(require(Permission.READ))]


def add_routes(router: APIRouter) -> None:
    """Add the routes to ``router`` (one mounted under ``/dicom-web``: ``OPTIONS`` is on its root)."""

    @router.get("/capabilities", tags=["capabilities"])
    async def get_capabilities(request: Request, principal: ReadPrincipal) -> JSONResponse:
        """What this DICOMweb service supports (resources, media types, parameters)."""
        return JSONResponse(capabilities(request.app.openapi()), headers=CORP_HEADERS)

    @router.options("", tags=["capabilities"])
    async def options_root(request: Request, principal: ReadPrincipal) -> JSONResponse:
        """The same description as ``/capabilities``, with ``Allow``."""
        return JSONResponse(
            capabilities(request.app.openapi()), headers={"Allow": "GET, OPTIONS", **CORP_HEADERS}
        )
