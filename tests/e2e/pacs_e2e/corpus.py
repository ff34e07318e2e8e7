"""Test data: pydicom's bundled real-world files and generated CT series."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def pydicom_corpus() -> list[CorpusFile]:
    """Every Part 10 file bundled with pydicom (network downloads are not used)."""
    files: list[CorpusFile] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = sorted(set(get_testdata_files("*")))
    for name in paths:
        path = Path(name)
        if path.suffix in {".json", ".txt", ".gz", ".icc", ".dump"} or path.is_dir():
            continue
        try:
            meta = read_file_meta_info(path)
            if not (meta.get("MediaStorageSOPClassUID") and meta.get("MediaStorageSOPInstanceUID")):
                continue  # storescu cannot send a file that does not say what it is
            files.append(
                CorpusFile(
                    path,
                    str(meta.MediaStorageSOPClassUID),
                    str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID),
                )
            )
        except Exception:
            continue  # no file meta: not a Part 10 file a modality would send
    return files


def write_ct_series(
    directory: Path,
    count: int,
    *,
    rows: int = 512,
    columns: int = 512,
    patient_id: str = "E2E-CT",
    patient_name: str = "E2E^CT",
    seed: int = 0,
) -> list[Path]:
    """A CT series of ``count`` 16-bit images, one study, one series."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid, series_uid = generate_uid(), generate_uid()
    frame_uid = generate_uid()
    pixels = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    paths = []
    for number in range(1, count + 1):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20261123"
        ds.StudyTime = "101500"
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.Modality = "CT"
        ds.Manufacturer = "PACS E2E"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "E2E CT series"
        ds.SeriesDescription = "Axial"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.FrameOfReferenceUID = frame_uid
        ds.ImagePositionPatient = [0, 0, float(number)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 1.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [0.7, 0.7]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        pixels[0, :8] = number  # every image different
        ds.PixelData = pixels.tobytes()
        path = directory / f"CT{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    meta = read_file_meta_info(path)
    offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    return path.read_bytes()[offset:]


def read_dataset(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


@dataclass(frozen=True)
class SeriesSpec:
    modality: str
    images: int
    body_part: str = ""


@dataclass
class StudyFiles:
    """A generated study: its identity and the files written for it."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    study_date: str
    accession_number: str
    series: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [p for paths in self.series.values() for p in paths]

    @property
    def modalities(self) -> set[str]:
        return {dcmread(paths[0], stop_before_pixels=True).Modality for paths in self.series.values()}


def write_study(
    directory: Path,
    *,
    patient_id: str,
    patient_name: str,
    study_date: str,
    accession_number: str,
    series: Sequence[SeriesSpec],
    study_description: str = "E2E study",
    birth_date: str = "19700101",
    size: int = 16,
) -> StudyFiles:
    """A small study (tiny 16-bit images, uncompressed) with the given
    series; every instance different."""
    study = StudyFiles(patient_id, patient_name, generate_uid(), study_date, accession_number)
    for series_number, spec in enumerate(series, 1):
        series_uid = generate_uid()
        folder = directory / study.study_instance_uid / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for number in range(1, spec.images + 1):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = study_date
            ds.StudyTime = "093000"
            ds.AccessionNumber = accession_number
            ds.Modality = spec.modality
            ds.StudyDescription = study_description
            ds.SeriesDescription = f"{spec.modality} series {series_number}"
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = birth_date
            ds.PatientSex = "O"
            if spec.body_part:
                ds.BodyPartExamined = spec.body_part
            ds.StudyInstanceUID = study.study_instance_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = series_number
            ds.InstanceNumber = number
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = size
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            pixels = np.full((size, size), number, dtype=np.uint16)
            ds.PixelData = pixels.tobytes()
            path = folder / f"IM{number:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        study.series[series_uid] = paths
    return study
