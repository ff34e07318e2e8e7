"""Fetching the images of a series over WADO-RS (httpx)."""

from __future__ import annotations

import io

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from ai_reference.contract import Auth, SeriesRef
from ai_reference.multipart import DICOM_MEDIA_TYPE, parse_multipart

__all__ = ["FetchError", "fetch_series"]

# Explicit VR Little Endian (transcoded by the server) first; as stored when
# the server cannot transcode.
ACCEPT = (
    f'multipart/related; type="{DICOM_MEDIA_TYPE}", '
    f'multipart/related; type="{DICOM_MEDIA_TYPE}"; transfer-syntax=*; q=0.5'
)


class FetchError(Exception):
    """The series could not be retrieved; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


async def fetch_series(
    client: httpx.AsyncClient, series: SeriesRef, auth: Auth | None, *, max_images: int
) -> list[Dataset]:
    """Every instance of ``series`` (WADO-RS Retrieve Series), parsed."""
    if len(series.instances) > max_images:
        raise FetchError(f"series has {len(series.instances)} images, more than {max_images}", 413)
    headers = {"Accept": ACCEPT}
    if auth is not None:
        headers["Authorization"] = f"Bearer {auth.token}"
    try:
        response = await client.get(series.series_url, headers=headers)
    except httpx.HTTPError as exc:
        raise FetchError(f"cannot retrieve {series.series_url}: {exc!r}") from exc
    if response.status_code != 200:
        raise FetchError(f"retrieving {series.series_url}: HTTP {response.status_code} {response.text[:200]}")
    parts = parse_multipart(response.headers.get("content-type", ""), response.content)
    if len(parts) > max_images:
        raise FetchError(f"series has {len(parts)} images, more than {max_images}", 413)
    return [dcmread(io.BytesIO(part.content), force=True) for part in parts]
