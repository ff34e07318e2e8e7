"""One inference request: fetch the CT series, analyse each, encode the results."""

from __future__ import annotations

import asyncio
import logging

import httpx
from pydicom.dataset import Dataset

from ai_reference.analysis import AnalysisConfig, analyse, to_part10
from ai_reference.contract import InferenceRequest
from ai_reference.fetch import FetchError, fetch_series
from ai_reference.volume import NotAVolumeError, build_volume

__all__ = ["InferenceError", "run_inference"]

logger = logging.getLogger(__name__)


class InferenceError(Exception):
    """The request cannot be answered with results; ``status`` says how to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _analyse_series(datasets: list[Dataset], config: AnalysisConfig) -> tuple[list[bytes], int, float]:
    volume = build_volume(datasets)
    result = analyse(volume, config)
    return [to_part10(result.segmentation), to_part10(result.report)], result.voxel_count, result.volume_mm3


async def run_inference(
    request: InferenceRequest,
    client: httpx.AsyncClient,
    config: AnalysisConfig,
    *,
    max_images: int,
) -> list[bytes]:
    """The Part 10 results (a SEG and an SR per CT series of the request)."""
    results: list[bytes] = []
    for series in request.series:
        if series.modality not in (None, "CT"):
            continue
        try:
            datasets = await fetch_series(client, series, request.auth, max_images=max_images)
        except FetchError as exc:
            raise InferenceError(str(exc), exc.status) from exc
        try:
            encoded, voxels, volume = await asyncio.to_thread(_analyse_series, datasets, config)
        except NotAVolumeError as exc:
            logger.info("series %s skipped: %s", series.series_instance_uid, exc)
            continue
        logger.info(
            "analysed series %s: %d voxels, %.1f mm3 >= %g HU",
            series.series_instance_uid,
            voxels,
            volume,
            config.threshold_hu,
        )
        results.extend(encoded)
    if not results:
        raise InferenceError("no CT series to analyse in the request", 422)
    return results
