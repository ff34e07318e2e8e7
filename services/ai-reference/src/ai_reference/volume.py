"""A CT series as a volume in Hounsfield units, slices in patient order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

__all__ = ["CtVolume", "NotAVolumeError", "build_volume"]


class NotAVolumeError(ValueError):
    """The images do not make one volume (no CT images, mixed geometry)."""


@dataclass(frozen=True)
class CtVolume:
    """``images`` sorted along the slice normal; ``hu[i]`` is ``images[i]``."""

    images: list[Dataset]
    hu: npt.NDArray[np.float32]  # (slices, rows, columns)
    voxel_volume_mm3: float

    @property
    def series_instance_uid(self) -> str:
        return str(self.images[0].SeriesInstanceUID)


def _normal(image: Dataset) -> npt.NDArray[np.float64]:
    orientation = np.asarray([float(v) for v in image.ImageOrientationPatient], dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def _slice_spacing(images: Sequence[Dataset], positions: Sequence[float]) -> float:
    if len(positions) > 1:
        gaps = np.diff(np.asarray(positions, dtype=np.float64))
        spacing = float(np.median(gaps))
        if spacing > 0:
            return spacing
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = images[0].get(keyword)
        if value is not None and float(value) > 0:
            return float(value)
    return 1.0


def build_volume(datasets: Sequence[Dataset]) -> CtVolume:
    """The single-frame CT images of ``datasets`` as one volume.

    Slices are ordered by Image Position (Patient) projected on the slice
    normal; stored values become HU with Rescale Slope and Intercept.
    """
    images = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage]
    if not images:
        raise NotAVolumeError("no CT images")
    first = images[0]
    shape = (int(first.Rows), int(first.Columns))
    normal = _normal(first)
    for image in images:
        if (int(image.Rows), int(image.Columns)) != shape:
            raise NotAVolumeError("the images differ in size")
        if str(image.SeriesInstanceUID) != str(first.SeriesInstanceUID):
            raise NotAVolumeError("the images belong to several series")
    keyed = sorted(
        ((float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])), ds) for ds in images),
        key=lambda pair: pair[0],
    )
    positions = [position for position, _ in keyed]
    ordered = [ds for _, ds in keyed]
    hu = np.empty((len(ordered), *shape), dtype=np.float32)
    for index, image in enumerate(ordered):
        slope = float(image.get("RescaleSlope", 1.0))
        intercept = float(image.get("RescaleIntercept", 0.0))
        hu[index] = image.pixel_array.astype(np.float32) * slope + intercept
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    voxel = row_spacing * column_spacing * _slice_spacing(ordered, positions)
    return CtVolume(images=ordered, hu=hu, voxel_volume_mm3=voxel)
