"""The reference analysis on a synthetic CT volume: a cube of bone-dense
voxels in a water/air background gives a known voxel count and volume, and
the SEG and SR it produces read back as valid DICOM with those numbers."""

from __future__ import annotations

import io
from typing import cast

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from ai_reference.analysis import AnalysisConfig, analyse, to_part10
from ai_reference.multipart import build_multipart, parse_multipart
from ai_reference.phantom import CubePhantom
from ai_reference.volume import NotAVolumeError, build_volume

PHANTOM = CubePhantom()
SLICES, ROWS, COLUMNS = PHANTOM.slices, PHANTOM.rows, PHANTOM.columns
CUBE_VOXELS = PHANTOM.cube_voxels  # 4 * 10 * 8 = 320
VOXEL_MM3 = PHANTOM.voxel_mm3  # 0.5 * 0.75 * 2.0


def ct_series(
    *, cube_hu: float = 1000.0, background_hu: float = 0.0, sop_class: str = CTImageStorage
) -> list[Dataset]:
    phantom = CubePhantom(cube_hu=cube_hu, background_hu=background_hu, sop_class_uid=sop_class)
    images = phantom.images()
    return images


def _numeric_items(content: Dataset) -> dict[str, tuple[float, str]]:
    """Concept name → (value, unit) of every NUM item of an SR content tree."""
    found: dict[str, tuple[float, str]] = {}
    for item in content.get("ContentSequence", []):
        if item.ValueType == "NUM":
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
            found[item.ConceptNameCodeSequence[0].CodeMeaning] = (float(measured.NumericValue), unit)
        found.update(_numeric_items(item))
    return found


def test_cube_gives_the_expected_voxel_count_and_volume() -> None:
    result = analyse(build_volume(ct_series()), AnalysisConfig(threshold_hu=300))
    assert result.voxel_count == CUBE_VOXELS
    assert result.volume_mm3 == pytest.approx(CUBE_VOXELS * VOXEL_MM3)  # 240 mm³


def test_slices_are_ordered_by_position_not_by_arrival() -> None:
    images = ct_series()
    volume = build_volume(images)
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.images]
    assert z == sorted(z)
    # The cube is on 4 consecutive slices wherever they arrived in the list.
    bone_slices = [i for i in range(SLICES) if (volume.hu[i] >= 300).any()]
    assert bone_slices == list(range(bone_slices[0], bone_slices[0] + 4))
    assert volume.voxel_volume_mm3 == pytest.approx(VOXEL_MM3)


def test_threshold_decides_what_is_segmented() -> None:
    images = ct_series(cube_hu=250.0)
    assert analyse(build_volume(images), AnalysisConfig(threshold_hu=300)).voxel_count == 0
    assert analyse(build_volume(images), AnalysisConfig(threshold_hu=200)).voxel_count == CUBE_VOXELS
    # Background at 0 HU counts once the threshold is below it.
    everything = analyse(build_volume(images), AnalysisConfig(threshold_hu=-500)).voxel_count
    assert everything == SLICES * ROWS * COLUMNS


def test_segmentation_reads_back_with_the_mask_and_the_source_references() -> None:
    images = ct_series()
    volume = build_volume(images)
    result = analyse(volume, AnalysisConfig())
    seg = hd.seg.segread(io.BytesIO(to_part10(result.segmentation)))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == images[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == images[0].FrameOfReferenceUID
    assert seg.number_of_segments == 1
    assert seg.get_segment_description(1).segment_label == "Bone"
    source_uids = [str(ds.SOPInstanceUID) for ds in volume.images]
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[1])
    assert mask.shape == (SLICES, ROWS, COLUMNS, 1)
    expected = volume.hu >= 300
    assert np.array_equal(mask[..., 0].astype(bool), expected)
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == set(source_uids)


def test_report_is_a_tid1500_measurement_of_the_segment() -> None:
    images = ct_series()
    result = analyse(build_volume(images), AnalysisConfig())
    sr = hd.sr.srread(io.BytesIO(to_part10(result.report)))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == images[0].StudyInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    numbers = _numeric_items(sr)
    assert numbers["Volume"][0] == pytest.approx(CUBE_VOXELS * VOXEL_MM3)
    assert numbers["Volume"][1] == "mm3"
    assert numbers["Segmented voxel count"] == (CUBE_VOXELS, "{voxels}")
    groups = cast(hd.sr.MeasurementReport, sr.content).get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    segment = groups[0].referenced_segment
    assert segment is not None
    assert segment.referenced_sop_instance_uid == result.segmentation.SOPInstanceUID
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert result.segmentation.SOPInstanceUID in evidence


def test_same_input_same_output() -> None:
    images = ct_series()
    first = analyse(build_volume(images), AnalysisConfig())
    second = analyse(build_volume(list(reversed(images))), AnalysisConfig())
    assert (first.voxel_count, first.volume_mm3) == (second.voxel_count, second.volume_mm3)
    assert first.segmentation.SOPInstanceUID == second.segmentation.SOPInstanceUID
    assert first.report.SOPInstanceUID == second.report.SOPInstanceUID
    other = analyse(build_volume(images), AnalysisConfig(threshold_hu=500))
    assert other.segmentation.SOPInstanceUID != first.segmentation.SOPInstanceUID


def test_empty_segmentation_is_still_valid() -> None:
    result = analyse(build_volume(ct_series(cube_hu=0.0)), AnalysisConfig())
    assert (result.voxel_count, result.volume_mm3) == (0, 0.0)
    seg = hd.seg.segread(io.BytesIO(to_part10(result.segmentation)))
    assert seg.number_of_segments == 1


def test_non_ct_images_are_not_a_volume() -> None:
    with pytest.raises(NotAVolumeError):
        build_volume(ct_series(sop_class=MRImageStorage))


def test_multipart_round_trip() -> None:
    contents = [b"first\r\n--not-a-boundary", b"", bytes(range(256)) * 4]
    content_type, body = build_multipart(contents)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    parts = parse_multipart(content_type, body)
    assert [p.content for p in parts] == contents
    assert all(p.content_type == "application/dicom" for p in parts)
