"""DICOMweb end to end: dicomweb-client, the requests OHIF makes, and bad
input, against the whole running system (gateway, worker, query-service,
dicomweb-api) with real authentication (API tokens made by the service's
bootstrap command, OIDC JWTs signed by an issuer served from the test).

What goes in over one protocol comes out over the other: STOW-RS → C-FIND
and C-MOVE, C-STORE → QIDO-RS and WADO-RS (byte-identical as stored).
"""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from pacs_common.localrun.infra import find_free_port
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import CorpusFile, SeriesSpec, StudyFiles, dataset_bytes, write_ct_series, write_study
from pacs_e2e.dcmtk import (
    ReferenceReceiver,
    final_status,
    findscu,
    movescu,
    store_outcomes,
    storescu,
    write_storescu_config,
)
from pacs_e2e.dicomweb import (
    OidcIssuer,
    bearer_session,
    create_api_token,
    multipart_body,
    parse_multipart,
    security_cli,
    web_client,
)
from pacs_e2e.index import IndexReader
from pacs_e2e.system import pacs_cli, running_system

VIEWER_ORIGIN = "http://viewer.example"
AUDIENCE = "pacs-e2e"
DICOM_JSON = "application/dicom+json"
STOW_BOUNDARY = "e2e-stow-boundary-3c1d"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Store Instances Response Module (PS3.18 Table 10.5.3-2) and FailureReason values.
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
CANNOT_UNDERSTAND = 0xC000
DATASET_DOES_NOT_MATCH = 0xA900
CT_IMAGES = 8  # 512×512×16 bit: 4 MB in one STOW-RS request


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(AUDIENCE) as oidc:
        yield oidc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, issuer: OidcIssuer) -> Iterator[LocalSystem]:
    """The whole PACS with OIDC pointed at ``issuer`` and CORS for one viewer origin.

    dicomweb-client sends ``Host`` without the port; the local runner tells
    the dicomweb-api its public URL (PACS_DICOMWEB_PUBLIC_BASE_URL), as a
    deployment behind a proxy would, so links still carry it.
    """
    env = {**issuer.settings, "PACS_DICOMWEB_CORS_ALLOWED_ORIGINS": f'["{VIEWER_ORIGIN}"]'}
    with running_system(tmp_path_factory.mktemp("pacs-web"), extra_env=env) as system:
        yield system


@pytest.fixture(scope="module")
def base_url(pacs: LocalSystem) -> str:
    (service,) = pacs.dicomweb_services
    return service.base_url


@pytest.fixture(scope="module")
def admin_token(pacs: LocalSystem) -> str:
    return create_api_token(pacs, "e2e-admin", "administrator")


@pytest.fixture(scope="module")
def session(admin_token: str) -> Iterator[requests.Session]:
    with bearer_session(admin_token) as http:
        yield http


@pytest.fixture(scope="module")
def web(base_url: str, admin_token: str) -> DICOMwebClient:
    return web_client(base_url, admin_token)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(
        tmp_path_factory.mktemp("stow-ct"), CT_IMAGES, patient_id="WEB-CT", patient_name="Stow^Carla"
    )


@dataclass(frozen=True)
class Stowed:
    response: Dataset
    request_headers: list[Mapping[str, str | bytes]]


@pytest.fixture(scope="module")
def stowed(base_url: str, admin_token: str, index: IndexReader, ct_series: list[Path]) -> Stowed:
    """The CT series stored with dicomweb-client in one request (chunked:
    the body is over dicomweb-client's 1 MB chunk size)."""
    sent: list[Mapping[str, str | bytes]] = []

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        sent.append(dict(response.request.headers))

    session = bearer_session(admin_token)
    session.hooks["response"].append(record)
    with session:
        client = DICOMwebClient(url=f"{base_url}/dicom-web", session=session)
        response: Dataset = client.store_instances([dcmread(p) for p in ct_series])
    index.wait_for_instances(_sop_uid(p) for p in ct_series)
    return Stowed(response, sent)


@pytest.fixture(scope="module")
def c_stored(pacs: LocalSystem, index: IndexReader, tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    """A study sent by storescu, with a patient name OHIF's ``*x*`` search finds."""
    study = write_study(
        tmp_path_factory.mktemp("cstore"),
        patient_id="WEB-DIMSE",
        patient_name="Wax^Alex",
        study_date="20250301",
        accession_number="WEB-A1",
        series=[SeriesSpec("MR", 2, "HEAD"), SeriesSpec("MR", 1, "HEAD")],
        study_description="Brain MRI",
    )
    outcomes = store_outcomes(storescu(pacs.gateway_port, study.paths))
    assert set(outcomes.values()) == {"Success"}, outcomes
    index.wait_for_instances(_sop_uid(p) for p in study.paths)
    return study


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _uids(matches: list[dict[str, Any]], tag: str) -> set[str]:
    return {m[tag]["Value"][0] for m in matches}


def _part10(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _stored_files(pacs: LocalSystem) -> set[Path]:
    return {p for p in pacs.storage_path.rglob("*") if p.is_file()}


def _spool_leftovers(pacs: LocalSystem) -> list[Path]:
    spool = Path(pacs.env["PACS_DICOMWEB_SPOOL_DIR"])
    return sorted(spool.glob("stow-*")) if spool.exists() else []


def _new_instance(patient_id: str, tmp_path: Path) -> Dataset:
    (path,) = write_study(
        tmp_path,
        patient_id=patient_id,
        patient_name="Bad^Input",
        study_date="20250401",
        accession_number="WEB-BAD",
        series=[SeriesSpec("CT", 1)],
    ).paths
    return dcmread(path)


# -- dicomweb-client: STOW-RS, then C-FIND and C-MOVE -------------------------


def test_stow_of_a_multi_megabyte_series(stowed: Stowed, ct_series: list[Path], base_url: str) -> None:
    assert sum(p.stat().st_size for p in ct_series) > 4 * 1024 * 1024
    (headers,) = stowed.request_headers
    assert headers.get("Transfer-Encoding") == "chunked", headers
    assert "Content-Length" not in headers
    result = stowed.response
    assert "FailedSOPSequence" not in result
    referenced = {str(item.ReferencedSOPInstanceUID) for item in result.ReferencedSOPSequence}
    assert referenced == {_sop_uid(p) for p in ct_series}
    study_uid = str(dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID)
    assert result.RetrieveURL == f"{base_url}/dicom-web/studies/{study_uid}"


def test_stowed_series_is_found_over_c_find(
    pacs: LocalSystem, stowed: Stowed, ct_series: list[Path], tmp_path: Path
) -> None:
    first = dcmread(ct_series[0], stop_before_pixels=True)
    result, responses = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            "PatientID=WEB-CT",
            "StudyInstanceUID",
            "PatientName",
            "NumberOfStudyRelatedInstances",
            "ModalitiesInStudy",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.output
    assert [str(r.StudyInstanceUID) for r in responses] == [str(first.StudyInstanceUID)]
    assert str(responses[0].PatientName) == "Stow^Carla"
    assert int(responses[0].NumberOfStudyRelatedInstances) == CT_IMAGES
    _, images = findscu(
        pacs.gateway_port,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={first.StudyInstanceUID}",
            f"SeriesInstanceUID={first.SeriesInstanceUID}",
            "SOPInstanceUID",
        ],
        tmp_path / "images",
    )
    assert {str(r.SOPInstanceUID) for r in images} == {_sop_uid(p) for p in ct_series}


def test_stowed_series_is_retrieved_over_c_move(
    pacs: LocalSystem, stowed: Stowed, ct_series: list[Path], tmp_path: Path
) -> None:
    port = find_free_port()
    added = pacs_cli(pacs, "node", "add", "REFERENCE", "--host", "127.0.0.1", "--port", str(port))
    assert added.returncode == 0, added.stdout + added.stderr
    study_uid = str(dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID)
    with ReferenceReceiver(tmp_path / "ref", port) as receiver:
        result = movescu(
            pacs.gateway_port,
            "-S",
            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"],
            "REFERENCE",
        )
        received = receiver.received()
    assert final_status(result, "Move") == "Success", result.output
    by_uid = {_sop_uid(p): dcmread(p) for p in received}
    assert set(by_uid) == {_sop_uid(p) for p in ct_series}
    for path in ct_series:
        original = dcmread(path)
        got = by_uid[str(original.SOPInstanceUID)]
        assert got.PixelData == original.PixelData
        assert got.PatientName == original.PatientName


# -- dicomweb-client: search and retrieve --------------------------------------


def test_search_at_every_level(web: DICOMwebClient, stowed: Stowed, ct_series: list[Path]) -> None:
    first = dcmread(ct_series[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    sop_uids = {_sop_uid(p) for p in ct_series}

    studies = web.search_for_studies(search_filters={"PatientID": "WEB-CT"})
    assert _uids(studies, "0020000D") == {study}
    assert studies[0]["00201208"]["Value"] == [CT_IMAGES]
    assert studies[0]["00100010"]["Value"] == [{"Alphabetic": "Stow^Carla"}]

    in_study = web.search_for_series(study_instance_uid=study)
    assert _uids(in_study, "0020000E") == {series}
    assert in_study[0]["00080060"]["Value"] == ["CT"]
    anywhere = web.search_for_series(search_filters={"PatientID": "WEB-CT", "Modality": "CT"})
    assert _uids(anywhere, "0020000E") == {series}

    assert _uids(web.search_for_instances(study, series), "00080018") == sop_uids
    assert _uids(web.search_for_instances(study_instance_uid=study), "00080018") == sop_uids
    everywhere = web.search_for_instances(search_filters={"PatientID": "WEB-CT"})
    assert _uids(everywhere, "00080018") == sop_uids
    first_two = web.search_for_instances(study, series, limit=2, offset=0)
    next_two = web.search_for_instances(study, series, limit=2, offset=2)
    assert len(first_two) == len(next_two) == 2
    assert not _uids(first_two, "00080018") & _uids(next_two, "00080018")

    assert web.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_retrieve_study_series_instance(web: DICOMwebClient, stowed: Stowed, ct_series: list[Path]) -> None:
    originals = {_sop_uid(p): dcmread(p) for p in ct_series}
    first = next(iter(originals.values()))
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)

    for retrieved in (web.retrieve_study(study), web.retrieve_series(study, series)):
        assert {str(ds.SOPInstanceUID) for ds in retrieved} == set(originals)
        for ds in retrieved:
            assert ds.PixelData == originals[str(ds.SOPInstanceUID)].PixelData
    instance = web.retrieve_instance(study, series, str(first.SOPInstanceUID))
    assert instance.PixelData == first.PixelData
    assert instance.PatientName == "Stow^Carla"


def test_retrieve_metadata_frames_bulkdata_rendered(
    web: DICOMwebClient, stowed: Stowed, ct_series: list[Path], base_url: str
) -> None:
    first = dcmread(ct_series[0])
    uids = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPInstanceUID))

    series_metadata = web.retrieve_series_metadata(*uids[:2])
    assert _uids(series_metadata, "00080018") == {_sop_uid(p) for p in ct_series}
    study_metadata = web.retrieve_study_metadata(uids[0])
    assert len(study_metadata) == CT_IMAGES
    metadata = web.retrieve_instance_metadata(*uids)
    assert metadata["00280010"]["Value"] == [512]
    bulk_uri = metadata["7FE00010"]["BulkDataURI"]
    assert bulk_uri.startswith(f"{base_url}/dicom-web/studies/{uids[0]}/")
    assert web.retrieve_bulkdata(bulk_uri) == [first.PixelData]

    assert web.retrieve_instance_frames(*uids, frame_numbers=[1]) == [first.PixelData]
    as_stored = web.retrieve_instance_frames(
        *uids, frame_numbers=[1], media_types=(("application/octet-stream", "*"),)
    )
    assert as_stored == [first.PixelData]

    jpeg = web.retrieve_instance_rendered(*uids, media_types=("image/jpeg",))
    image = Image.open(io.BytesIO(jpeg))
    assert (image.format, image.size) == ("JPEG", (512, 512))
    png = web.retrieve_instance_frames_rendered(*uids, frame_numbers=[1], media_types=("image/png",))
    assert Image.open(io.BytesIO(png)).format == "PNG"


# -- C-STORE in, DICOMweb out --------------------------------------------------


def test_c_stored_study_is_found_over_qido(web: DICOMwebClient, c_stored: StudyFiles) -> None:
    studies = web.search_for_studies(search_filters={"PatientID": "WEB-DIMSE"})
    assert _uids(studies, "0020000D") == {c_stored.study_instance_uid}
    assert studies[0]["00081030"]["Value"] == ["Brain MRI"]
    assert studies[0]["00201206"]["Value"] == [2]
    series = web.search_for_series(c_stored.study_instance_uid)
    assert _uids(series, "0020000E") == set(c_stored.series)
    instances = web.search_for_instances(study_instance_uid=c_stored.study_instance_uid)
    assert _uids(instances, "00080018") == {_sop_uid(p) for p in c_stored.paths}


def test_c_stored_study_is_retrieved_byte_identical_over_wado(
    base_url: str, session: requests.Session, c_stored: StudyFiles, tmp_path: Path
) -> None:
    response = session.get(
        f"{base_url}/dicom-web/studies/{c_stored.study_instance_uid}", headers={"Accept": AS_STORED}
    )
    assert response.status_code == 200, response.text
    parts = parse_multipart(response.headers["Content-Type"], response.content)
    received: dict[str, Path] = {}
    for number, part in enumerate(parts):
        assert part.content_type.startswith("application/dicom"), part.headers
        path = tmp_path / f"part{number}.dcm"
        path.write_bytes(part.body)
        received[_sop_uid(path)] = path
    assert set(received) == {_sop_uid(p) for p in c_stored.paths}
    for original in c_stored.paths:
        assert dataset_bytes(received[_sop_uid(original)]) == dataset_bytes(original)


def test_truncated_search_carries_a_warning(
    base_url: str, session: requests.Session, c_stored: StudyFiles
) -> None:
    url = f"{base_url}/dicom-web/studies/{c_stored.study_instance_uid}/instances"
    page = session.get(url, params={"limit": "2"}, headers={"Accept": DICOM_JSON})
    assert page.status_code == 200, page.text
    assert len(page.json()) == 2
    assert page.headers["Warning"].startswith('299 dicomweb-api: "The number of results exceeded')
    rest = session.get(url, params={"limit": "2", "offset": "2"}, headers={"Accept": DICOM_JSON})
    assert len(rest.json()) == 1
    assert "Warning" not in rest.headers


def test_deleted_study_is_gone_over_dicomweb_and_dimse(
    pacs: LocalSystem, web: DICOMwebClient, index: IndexReader, tmp_path: Path
) -> None:
    study = write_study(
        tmp_path,
        patient_id="WEB-DELETE",
        patient_name="Gone^Soon",
        study_date="20250501",
        accession_number="WEB-D1",
        series=[SeriesSpec("CR", 2)],
    )
    web.store_instances([dcmread(p) for p in study.paths])
    rows = index.wait_for_instances(_sop_uid(p) for p in study.paths)
    objects = [pacs.storage_path / row["key"] for row in rows.values()]
    assert all(path.is_file() for path in objects)

    web.delete_study(study.study_instance_uid)

    assert web.search_for_studies(search_filters={"PatientID": "WEB-DELETE"}) == []
    with pytest.raises(requests.HTTPError) as missing:
        web.retrieve_study_metadata(study.study_instance_uid)
    assert missing.value.response is not None
    assert missing.value.response.status_code == 404
    _, responses = findscu(
        pacs.gateway_port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "PatientID=WEB-DELETE", "StudyInstanceUID"],
        tmp_path,
    )
    assert responses == []
    assert index.count_instances(_sop_uid(p) for p in study.paths) == 0
    assert not any(path.exists() for path in objects)


# -- the requests OHIF makes, header by header ----------------------------------


def test_ohif_study_list(base_url: str, session: requests.Session, c_stored: StudyFiles) -> None:
    url = (
        f"{base_url}/dicom-web/studies?limit=101&offset=0&fuzzymatching=false"
        "&includefield=00081030%2C00080060&PatientName=*x*"
    )
    response = session.get(url, headers={"Accept": DICOM_JSON, "Origin": VIEWER_ORIGIN})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == DICOM_JSON
    assert response.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"warning", "content-type"} <= exposed
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    (study,) = response.json()
    assert study["0020000D"]["Value"] == [c_stored.study_instance_uid]
    assert study["00081030"]["Value"] == ["Brain MRI"]
    assert study["00080061"]["Value"] == ["MR"]
    assert study["00100010"]["Value"] == [{"Alphabetic": "Wax^Alex"}]
    assert study["00081190"]["Value"] == [f"{base_url}/dicom-web/studies/{c_stored.study_instance_uid}"]


def test_cors_preflight_needs_no_credentials(base_url: str) -> None:
    preflight = requests.options(
        f"{base_url}/dicom-web/studies",
        headers={
            "Origin": VIEWER_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=10,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert "GET" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    stranger = requests.options(
        f"{base_url}/dicom-web/studies",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert stranger.status_code == 400
    assert "Access-Control-Allow-Origin" not in stranger.headers


def test_ohif_series_metadata(
    base_url: str, session: requests.Session, stowed: Stowed, ct_series: list[Path]
) -> None:
    first = dcmread(ct_series[0], stop_before_pixels=True)
    response = session.get(
        f"{base_url}/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/metadata",
        headers={"Accept": "application/dicom+json, application/json", "Origin": VIEWER_ORIGIN},
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == DICOM_JSON
    assert response.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    etag = response.headers["ETag"]
    cached = session.get(
        f"{base_url}/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/metadata",
        headers={"Accept": DICOM_JSON, "Origin": VIEWER_ORIGIN, "If-None-Match": etag},
    )
    assert cached.status_code == 304, cached.text
    assert cached.content == b""
    assert cached.headers["ETag"] == etag
    assert cached.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    instances = response.json()
    assert _uids(instances, "00080018") == {_sop_uid(p) for p in ct_series}
    for instance in instances:
        assert instance["0020000D"]["Value"] == [str(first.StudyInstanceUID)]
        assert instance["00280030"]["Value"] == [0.7, 0.7]
        assert "InlineBinary" not in instance["7FE00010"]
        assert instance["7FE00010"]["BulkDataURI"].startswith(base_url)


def test_ohif_frame_with_transfer_syntax_star(
    base_url: str, session: requests.Session, stowed: Stowed, ct_series: list[Path]
) -> None:
    first = dcmread(ct_series[2])
    url = (
        f"{base_url}/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        f"/instances/{first.SOPInstanceUID}/frames/1"
    )
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    response = session.get(url, headers={"Accept": accept, "Origin": VIEWER_ORIGIN})
    assert response.status_code == 200, response.text
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related")
    assert (
        'type="application/octet-stream"' in content_type or "type=application/octet-stream" in content_type
    )
    assert "boundary=" in content_type
    assert response.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    (part,) = parse_multipart(content_type, response.content)
    assert part.content_type.split(";")[0].strip() == "application/octet-stream"
    assert "transfer-syntax=1.2.840.10008.1.2.1" in part.content_type.replace(" ", "")
    assert part.body == first.PixelData


@pytest.fixture(scope="module")
def jpeg2000(pacs: LocalSystem, index: IndexReader, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """pydicom's JPEG 2000 lossless MR image, in a study of its own, sent by
    storescu in its own transfer syntax."""
    source = get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    assert source is not None
    ds = dcmread(source)
    ds.PatientID, ds.PatientName = "WEB-J2K", "Jpeg^Jill"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    directory = tmp_path_factory.mktemp("j2k")
    path = directory / "MR-J2K.dcm"
    ds.save_as(path, enforce_file_format=True)
    file = CorpusFile(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    profile = write_storescu_config([file], directory / "storescu.cfg")
    result = storescu(pacs.gateway_port, [path], config=(directory / "storescu.cfg", profile))
    assert set(store_outcomes(result).values()) == {"Success"}, result.output
    index.wait_for_instances([str(ds.SOPInstanceUID)])
    return ds


def test_ohif_frame_of_a_compressed_image_as_stored(
    base_url: str, session: requests.Session, jpeg2000: Dataset
) -> None:
    url = (
        f"{base_url}/dicom-web/studies/{jpeg2000.StudyInstanceUID}/series/{jpeg2000.SeriesInstanceUID}"
        f"/instances/{jpeg2000.SOPInstanceUID}/frames/1"
    )
    syntax = str(jpeg2000.file_meta.TransferSyntaxUID)
    as_stored = session.get(
        url, headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
    )
    assert as_stored.status_code == 200, as_stored.text
    assert f"transfer-syntax={syntax}" in as_stored.headers["Content-Type"]
    (part,) = parse_multipart(as_stored.headers["Content-Type"], as_stored.content)
    assert part.content_type.replace(" ", "") == f"application/octet-stream;transfer-syntax={syntax}"
    assert part.body == next(generate_frames(jpeg2000.PixelData, number_of_frames=1))

    decoded = session.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert decoded.status_code == 200, decoded.text
    (pixels,) = parse_multipart(decoded.headers["Content-Type"], decoded.content)
    assert pixels.body == jpeg2000.pixel_array.astype(jpeg2000.pixel_array.dtype.newbyteorder("<")).tobytes()

    refused = session.get(
        url,
        headers={
            "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.4.50'
        },
    )
    assert refused.status_code == 406, refused.text
    assert f"stored in transfer syntax {syntax}" in refused.json()["detail"]


# -- bad input: a precise 4xx, nothing stored half-way ---------------------------


def test_malformed_multipart_is_400_and_stores_nothing(
    pacs: LocalSystem, base_url: str, session: requests.Session, index: IndexReader, tmp_path: Path
) -> None:
    ds = _new_instance("WEB-MALFORMED", tmp_path)
    before = _stored_files(pacs)
    whole = multipart_body([("application/dicom", _part10(ds))], STOW_BOUNDARY)
    truncated = whole[: -len(f"--{STOW_BOUNDARY}--\r\n") - 10]
    response = session.post(
        f"{base_url}/dicom-web/studies", data=truncated, headers={"Content-Type": STOW_CONTENT_TYPE}
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "malformed multipart body: it ends before the closing boundary"
    no_boundary = session.post(
        f"{base_url}/dicom-web/studies",
        data=whole,
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
    )
    assert no_boundary.status_code == 400, no_boundary.text
    assert no_boundary.json()["detail"] == "multipart/related Content-Type without a valid boundary parameter"
    assert _stored_files(pacs) == before
    assert _spool_leftovers(pacs) == []
    assert index.count_instances([str(ds.SOPInstanceUID)]) == 0


def test_non_dicom_parts_are_409_cannot_understand(
    pacs: LocalSystem, base_url: str, session: requests.Session, index: IndexReader
) -> None:
    before = _stored_files(pacs)
    body = multipart_body(
        [("application/dicom", b"this is not a DICOM object" * 10), ("text/plain", b"hello")], STOW_BOUNDARY
    )
    response = session.post(
        f"{base_url}/dicom-web/studies", data=body, headers={"Content-Type": STOW_CONTENT_TYPE}
    )
    assert response.status_code == 409, response.text
    assert response.headers["Content-Type"].split(";")[0] == DICOM_JSON
    assert response.headers["Warning"].startswith('299 pacs "2 of 2 instances were not stored')
    failed = response.json()[FAILED_SOP_SEQUENCE]["Value"]
    assert [f[FAILURE_REASON]["Value"] for f in failed] == [[CANNOT_UNDERSTAND], [CANNOT_UNDERSTAND]]
    assert REFERENCED_SOP_SEQUENCE not in response.json()
    assert _stored_files(pacs) == before
    assert _spool_leftovers(pacs) == []


def test_a_non_dicom_part_beside_a_good_one_is_202(
    base_url: str, session: requests.Session, index: IndexReader, tmp_path: Path
) -> None:
    ds = _new_instance("WEB-MIXED", tmp_path)
    body = multipart_body([("application/dicom", _part10(ds)), ("text/plain", b"hello")], STOW_BOUNDARY)
    response = session.post(
        f"{base_url}/dicom-web/studies", data=body, headers={"Content-Type": STOW_CONTENT_TYPE}
    )
    assert response.status_code == 202, response.text
    assert "1 of 2 instances were not stored" in response.headers["Warning"]
    result = response.json()
    (stored,) = result[REFERENCED_SOP_SEQUENCE]["Value"]
    assert stored[REFERENCED_SOP_INSTANCE_UID]["Value"] == [str(ds.SOPInstanceUID)]
    (failed,) = result[FAILED_SOP_SEQUENCE]["Value"]
    assert failed[FAILURE_REASON]["Value"] == [CANNOT_UNDERSTAND]
    index.wait_for_instances([str(ds.SOPInstanceUID)])


def test_wrong_study_uid_in_the_path_is_409_and_stores_nothing(
    pacs: LocalSystem, base_url: str, session: requests.Session, index: IndexReader, tmp_path: Path
) -> None:
    ds = _new_instance("WEB-WRONG-STUDY", tmp_path)
    other_study = generate_uid()
    before = _stored_files(pacs)
    body = multipart_body([("application/dicom", _part10(ds))], STOW_BOUNDARY)
    response = session.post(
        f"{base_url}/dicom-web/studies/{other_study}", data=body, headers={"Content-Type": STOW_CONTENT_TYPE}
    )
    assert response.status_code == 409, response.text
    assert f"is not the request's {other_study}" in response.headers["Warning"]
    result = response.json()
    (failed,) = result[FAILED_SOP_SEQUENCE]["Value"]
    assert failed[FAILURE_REASON]["Value"] == [DATASET_DOES_NOT_MATCH]
    assert failed[REFERENCED_SOP_INSTANCE_UID]["Value"] == [str(ds.SOPInstanceUID)]
    assert result["00081190"]["Value"] == [f"{base_url}/dicom-web/studies/{other_study}"]
    assert _stored_files(pacs) == before
    assert index.count_instances([str(ds.SOPInstanceUID)]) == 0


def test_huge_bogus_content_length_is_413_and_stores_nothing(
    pacs: LocalSystem, base_url: str, admin_token: str, index: IndexReader, tmp_path: Path
) -> None:
    ds = _new_instance("WEB-HUGE", tmp_path)
    body = multipart_body([("application/dicom", _part10(ds))], STOW_BOUNDARY)
    before = _stored_files(pacs)
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/dicom-web/studies")
        connection.putheader("Authorization", f"Bearer {admin_token}")
        connection.putheader("Content-Type", STOW_CONTENT_TYPE)
        connection.putheader("Content-Length", str(10**15))
        connection.endheaders()
        connection.send(body)
        response = connection.getresponse()
        status, payload = response.status, response.read()
    finally:
        connection.close()
    assert status == 413, payload
    assert b"larger than" in payload
    assert _stored_files(pacs) == before
    assert _spool_leftovers(pacs) == []
    assert index.count_instances([str(ds.SOPInstanceUID)]) == 0


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("limit=many", "limit must be an integer, got 'many'"),
        ("limit=0", "limit must be at least 1, got 0"),
        ("offset=-5", "offset must be at least 0, got -5"),
        ("fuzzymatching=perhaps", "fuzzymatching must be true or false, got 'perhaps'"),
        ("PatientNickname=Al", "unknown attribute: 'PatientNickname'"),
        ("includefield=NoSuchKeyword", "unknown attribute: 'NoSuchKeyword'"),
        ("PatientName.PatientID=x", "PatientName is not a sequence"),
    ],
)
def test_invalid_qido_parameters_are_400(
    base_url: str, session: requests.Session, query: str, reason: str
) -> None:
    response = session.get(f"{base_url}/dicom-web/studies?{query}", headers={"Accept": DICOM_JSON})
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


# -- authentication through the running service --------------------------------


def test_oidc_tokens(base_url: str, issuer: OidcIssuer, c_stored: StudyFiles) -> None:
    url = f"{base_url}/dicom-web/studies?PatientID=WEB-DIMSE"

    def get(token: str | None) -> requests.Response:
        headers = {"Accept": DICOM_JSON}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.get(url, headers=headers, timeout=30)

    valid = get(issuer.token(["viewer"]))
    assert valid.status_code == 200, valid.text
    assert _uids(valid.json(), "0020000D") == {c_stored.study_instance_uid}

    refused = {
        "token expired": get(issuer.token(["viewer"], expires_in=-3600)),
        "token signature invalid": get(issuer.forged_token(["viewer"])),
        f"wrong token audience (expected {AUDIENCE})": get(issuer.token(["viewer"], extra={"aud": "other"})),
        "no credentials": get(None),
    }
    for reason, response in refused.items():
        assert response.status_code == 401, (reason, response.text)
        assert response.json()["detail"].startswith(reason), response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_api_token_is_refused(pacs: LocalSystem, base_url: str) -> None:
    token = create_api_token(pacs, "e2e-revoked", "viewer")
    url = f"{base_url}/dicom-web/studies?PatientID=NOBODY"
    with bearer_session(token) as session:
        assert session.get(url).status_code == 200
        listed = security_cli(pacs, "token", "list", "--user", "e2e-revoked")
        (line,) = listed.stdout.splitlines()
        revoked = security_cli(pacs, "token", "revoke", line.split("\t")[0])
        assert revoked.returncode == 0, revoked.stderr
        refused = session.get(url)
    assert refused.status_code == 401, refused.text
    assert refused.json()["detail"] == "API token revoked"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_viewer_may_not_store(
    pacs: LocalSystem, base_url: str, issuer: OidcIssuer, index: IndexReader, tmp_path: Path
) -> None:
    ds = _new_instance("WEB-VIEWER", tmp_path)
    before = _stored_files(pacs)
    with bearer_session(issuer.token(["viewer"])) as viewer:
        response = viewer.post(
            f"{base_url}/dicom-web/studies",
            data=multipart_body([("application/dicom", _part10(ds))], STOW_BOUNDARY),
            headers={"Content-Type": STOW_CONTENT_TYPE},
        )
    assert response.status_code == 403, response.text
    assert response.json()["detail"] == "store permission required"
    assert _stored_files(pacs) == before
    assert index.count_instances([str(ds.SOPInstanceUID)]) == 0
