"""The connector's pure parts: what a rule matches, what answers are
accepted as results, and how an endpoint's answer is judged."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from ai_connector.matching import StudySeries, match_rules
from ai_connector.multipart import build_multipart
from ai_connector.results import InvalidResultError, check_results, parse_results
from ai_reference.analysis import to_part10
from ai_reference.phantom import CubePhantom
from pacs_common.ai import AiRule, SeriesFacts

CT = "1.2.840.10008.5.1.4.1.1.2"
NOW = datetime.now(UTC)


def rule(name: str = "r", **condition: object) -> AiRule:
    return AiRule.model_validate(
        {
            "id": 1,
            "name": name,
            "endpoint_url": "http://ai/v1/infer",
            "created_at": NOW,
            "updated_at": NOW,
            **condition,
        }
    )


STUDY = StudySeries(
    "1.2.3",
    "P1",
    [
        SeriesFacts("1.2.3.1", "CT", "chest ", frozenset({CT})),
        SeriesFacts("1.2.3.2", "CT", "ABDOMEN", frozenset({CT})),
        SeriesFacts("1.2.3.3", "SR", None, frozenset({"1.2.840.10008.5.1.4.1.1.88.34"})),
    ],
)


def test_rules_match_per_series() -> None:
    matches = match_rules(
        [
            rule("any-ct", modality="CT"),
            rule("chest", modality="CT", body_part_examined="Chest"),
            rule("ct-class", sop_class_uid=CT),
            rule("mr", modality="MR"),
            rule("off", modality="CT", enabled=False),
            rule("everything"),
        ],
        STUDY,
    )
    assert {m.rule.name: m.series_instance_uids for m in matches} == {
        "any-ct": ["1.2.3.1", "1.2.3.2"],
        "chest": ["1.2.3.1"],
        "ct-class": ["1.2.3.1", "1.2.3.2"],
        "everything": ["1.2.3.1", "1.2.3.2", "1.2.3.3"],
    }
    assert match_rules([rule(modality="CT")], StudySeries("9", None, [])) == []


def test_results_must_be_dicom_of_the_source_study() -> None:
    phantom = CubePhantom(slices=1)
    [image] = phantom.images()
    part10 = to_part10(image)
    [checked] = check_results([part10], phantom.study_instance_uid)
    assert (checked.sop_instance_uid, checked.data) == (str(image.SOPInstanceUID), part10)
    with pytest.raises(InvalidResultError, match="not to the source study"):
        check_results([part10], "1.2.3.4")
    with pytest.raises(InvalidResultError, match="result 2 is not a DICOM object"):
        check_results([part10, b"hello, world"], phantom.study_instance_uid)


def test_a_bare_dataset_gets_a_file_meta() -> None:
    [image] = CubePhantom(slices=1).images()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, image)  # the dataset alone: no preamble, no file meta
    bare = buffer.getvalue()
    assert bare[128:132] != b"DICM" and bare[:2] == b"\x08\x00"
    [checked] = check_results([bare], str(image.StudyInstanceUID))
    assert checked.data[128:132] == b"DICM"
    assert dcmread(io.BytesIO(checked.data)).SOPInstanceUID == image.SOPInstanceUID


def test_answers_must_be_multipart_dicom() -> None:
    content_type, body = build_multipart([b"a", b"b"])
    assert [p.content for p in parse_results(content_type, body)] == [b"a", b"b"]
    with pytest.raises(InvalidResultError, match="not a multipart"):
        parse_results("application/json", b"{}")
    content_type, body = build_multipart([b"{}"], media_type="application/json")
    with pytest.raises(InvalidResultError, match="part 1 is 'application/json'"):
        parse_results(content_type, body)
