"""A synthetic CT phantom: a cube of given HU in a uniform background.

For tests and demos of the reference service (and for integrators trying
it): the expected result is known exactly — the cube's voxel count, and its
volume from the pixel and slice spacing.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["CubePhantom"]


@dataclass(frozen=True)
class CubePhantom:
    """Geometry and values of the phantom; :meth:`images` makes the series."""

    slices: int = 10
    rows: int = 32
    columns: int = 24
    pixel_spacing: tuple[float, float] = (0.5, 0.75)
    slice_spacing: float = 2.0
    # The cube: [first, last) along slices, rows, columns.
    cube: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ((3, 7), (8, 18), (4, 12))
    cube_hu: float = 1000.0
    background_hu: float = 0.0
    patient_id: str = "AI-PHANTOM"
    patient_name: str = "Phantom^Cube"
    body_part: str = "CHEST"
    study_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    sop_class_uid: str = CTImageStorage
    modality: str = "CT"

    @property
    def cube_voxels(self) -> int:
        (s0, s1), (r0, r1), (c0, c1) = self.cube
        return (s1 - s0) * (r1 - r0) * (c1 - c0)

    @property
    def voxel_mm3(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    def hu(self) -> np.ndarray:
        volume = np.full((self.slices, self.rows, self.columns), self.background_hu, dtype=np.float64)
        (s0, s1), (r0, r1), (c0, c1) = self.cube
        volume[s0:s1, r0:r1, c0:c1] = self.cube_hu
        return volume

    def images(self, *, shuffle_seed: int | None = 7) -> list[Dataset]:
        """The series as datasets read back from Part 10 bytes (as a network
        peer would receive them), shuffled unless ``shuffle_seed`` is None."""
        frame = str(generate_uid(entropy_srcs=[self.series_instance_uid, "frame"]))
        volume = self.hu()
        images: list[Dataset] = []
        for index in range(self.slices):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = self.sop_class_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[self.series_instance_uid, str(index)])
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_instance_uid, self.series_instance_uid
            ds.FrameOfReferenceUID = frame
            ds.PatientName, ds.PatientID = self.patient_name, self.patient_id
            ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261204", "120000", "1", "AIACC"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "AI phantom"
            ds.Modality, ds.SeriesNumber, ds.InstanceNumber = self.modality, 1, index + 1
            ds.SeriesDescription = "Cube phantom"
            ds.BodyPartExamined = self.body_part
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            # Feet first: positions decrease with the instance number.
            ds.ImagePositionPatient = [-10.0, -20.0, 100.0 - self.slice_spacing * index]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = list(self.pixel_spacing)
            ds.SliceThickness = self.slice_spacing
            ds.Rows, ds.Columns = self.rows, self.columns
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = np.clip(volume[index] + 1024, 0, 4095).astype(np.uint16).tobytes()
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            images.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(images)
        return images

    def write(self, directory: Path) -> list[Path]:
        """The series as Part 10 files in ``directory`` (instance order)."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in self.images(shuffle_seed=None):
            path = directory / f"CT{int(ds.InstanceNumber):04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths
