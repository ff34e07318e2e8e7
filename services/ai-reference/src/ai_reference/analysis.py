"""The reference analysis: a Hounsfield-unit threshold segmentation of a CT
volume, as a DICOM Segmentation (highdicom, BINARY, one segment) and a
TID 1500 measurement report (Comprehensive 3D SR) of the segmented volume.

Deterministic: the same images and threshold give the same voxel count,
volume and UIDs (derived from the source UIDs and the parameters)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ai_reference.volume import CtVolume

__all__ = ["ALGORITHM_NAME", "AnalysisConfig", "AnalysisResult", "analyse", "to_part10"]

ALGORITHM_NAME: Final = "pacs-ai-reference HU threshold"
ALGORITHM_VERSION: Final = "1.0"
MANUFACTURER: Final = "PACS"
MODEL_NAME: Final = "ai-reference"
SEG_SERIES_NUMBER: Final = 901
SR_SERIES_NUMBER: Final = 902
#: The voxel count has no standard concept; a private coding scheme names it.
VOXEL_COUNT: Final = hd.sr.CodedConcept("VOXELCOUNT", "99PACSAI", "Segmented voxel count")
VOXELS_UNIT: Final = hd.sr.CodedConcept("{voxels}", "UCUM", "voxels")


@dataclass(frozen=True)
class AnalysisConfig:
    threshold_hu: float = 300.0
    segment_label: str = "Bone"


@dataclass(frozen=True)
class AnalysisResult:
    voxel_count: int
    volume_mm3: float
    segmentation: hd.seg.Segmentation
    report: hd.sr.Comprehensive3DSR


def _uid(volume: CtVolume, config: AnalysisConfig, what: str) -> str:
    sources = [str(ds.SOPInstanceUID) for ds in volume.images]
    return str(generate_uid(entropy_srcs=[what, f"{config.threshold_hu:g}", config.segment_label, *sources]))


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=ALGORITHM_VERSION, family=codes.DCM.ArtificialIntelligence
    )


def _segmentation(volume: CtVolume, mask: np.ndarray, config: AnalysisConfig) -> hd.seg.Segmentation:
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=config.segment_label,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Bone,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(),
        tracking_uid=_uid(volume, config, "tracking"),
        tracking_id=f"{config.segment_label} >= {config.threshold_hu:g} HU",
    )
    return hd.seg.Segmentation(
        source_images=volume.images,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_uid(volume, config, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(volume, config, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=ALGORITHM_VERSION,
        device_serial_number="1",
        content_description=f"{config.segment_label}: voxels >= {config.threshold_hu:g} HU",
        content_label="THRESHOLD",
        series_description=f"AI {config.segment_label} segmentation",
        # An empty mask still makes a (complete, empty) segmentation.
        omit_empty_frames=bool(mask.any()),
    )


def _report(
    volume: CtVolume,
    segmentation: hd.seg.Segmentation,
    voxel_count: int,
    volume_mm3: float,
    config: AnalysisConfig,
) -> hd.sr.Comprehensive3DSR:
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=ALGORITHM_VERSION)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(volume, config, "device"), name=MODEL_NAME, manufacturer_name=MANUFACTURER
        ),
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(volume, config, "tracking"), identifier=f"{config.segment_label} segmentation"
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=1,
            source_images=[
                hd.sr.SourceImageForSegmentation(image.SOPClassUID, image.SOPInstanceUID)
                for image in volume.images
            ],
        ),
        finding_type=codes.SCT.Bone,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=volume_mm3,
                unit=codes.UCUM.CubicMillimeter,
                algorithm_id=algorithm,
            ),
            hd.sr.Measurement(
                name=VOXEL_COUNT, value=float(voxel_count), unit=VOXELS_UNIT, algorithm_id=algorithm
            ),
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[segmentation, *volume.images],
        content=report,
        series_instance_uid=_uid(volume, config, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(volume, config, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI {config.segment_label} volume",
    )


def analyse(volume: CtVolume, config: AnalysisConfig) -> AnalysisResult:
    """Segment ``volume`` at ``config.threshold_hu`` and measure what was segmented."""
    mask = volume.hu >= np.float32(config.threshold_hu)
    voxel_count = int(np.count_nonzero(mask))
    volume_mm3 = voxel_count * volume.voxel_volume_mm3
    segmentation = _segmentation(volume, mask, config)
    report = _report(volume, segmentation, voxel_count, volume_mm3, config)
    return AnalysisResult(voxel_count, volume_mm3, segmentation, report)


def to_part10(dataset: Dataset) -> bytes:
    """``dataset`` as a Part 10 file (preamble, file meta)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
