"""The URLs this service hands out: RetrieveURL (QIDO-RS) and BulkDataURI
(WADO-RS metadata) values.

The base is ``settings.public_base_url`` when configured (a service behind a
proxy, or clients such as dicomweb-client that send ``Host`` without the
port), else the URL the request came in on (its ``Host`` header; uvicorn
applies ``X-Forwarded-Proto`` from trusted proxies).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from fastapi import Request

from dicomweb_api.settings import DicomwebSettings

__all__ = ["CORP_HEADERS", "DICOMWEB_PATH", "dicomweb_base", "instance_url", "series_url", "study_url"]

#: Where the DICOMweb routers are mounted (``app.DICOMWEB_PREFIX``).
DICOMWEB_PATH: Final = "/dicom-web"
#: On every DICOMweb response: a viewer served from another origin (OHIF,
#: cross-origin isolated for SharedArrayBuffer) may embed what it fetched.
CORP_HEADERS: Final = {"Cross-Origin-Resource-Policy": "cross-origin"}


def dicomweb_base(request: Request, settings: DicomwebSettings) -> str:
    """``{base}/dicom-web`` without a trailing slash."""
    base = settings.public_base_url or str(request.base_url)
    return base.rstrip("/") + DICOMWEB_PATH


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{quote(study, safe='')}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{study_url(base, study)}/series/{quote(series, safe='')}"


def instance_url(base: str, study: str, series: str, instance: str) -> str:
    return f"{series_url(base, study, series)}/instances/{quote(instance, safe='')}"
