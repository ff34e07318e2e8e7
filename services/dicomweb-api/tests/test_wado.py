"""WADO-RS instances and metadata, the capabilities description, and
dicomweb-client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicomweb_api.testing import ROLES_HEADER, Part, Store, StoredInstance, parse_multipart
from query_service.testing import dataset

BASE = "http://testserver/dicom-web"
STUDY = "1.2.826.0.1.3680043.10.100"
SERIES_A, SERIES_B = f"{STUDY}.1", f"{STUDY}.2"
ALL_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _image(series: str, sop: str, number: int) -> Dataset:
    ds = dataset(
        STUDY,
        series,
        sop,
        SeriesNumber=int(series.rsplit(".", 1)[1]),
        InstanceNumber=number,
        Rows=8,
        Columns=8,
    )
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(64, dtype="<u2") * number).tobytes()
    return ds


@pytest.fixture
async def study(store: Store) -> list[StoredInstance]:
    return await store(
        [
            _image(SERIES_A, f"{SERIES_A}.1", 1),
            _image(SERIES_A, f"{SERIES_A}.2", 2),
            _image(SERIES_B, f"{SERIES_B}.1", 3),
        ]
    )


@pytest.fixture
async def rle_instance(store: Store) -> StoredInstance:
    path = get_testdata_file("MR_small_RLE.dcm")
    assert isinstance(path, str)
    [stored] = await store([Path(path)])
    assert stored.transfer_syntax_uid == RLELossless
    return stored


def _parts(response: httpx.Response) -> list[Part]:
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    return parse_multipart(content_type, response.content)


async def test_study_series_and_instance_as_stored_byte_for_byte(
    client: httpx.AsyncClient, study: list[StoredInstance]
) -> None:
    response = await client.get(f"/dicom-web/studies/{STUDY}", headers={"accept": ALL_AS_STORED})
    parts = _parts(response)
    assert [p.content for p in parts] == [s.data for s in study]
    for part, stored in zip(parts, study, strict=True):
        assert (
            part.headers["content-type"] == f"application/dicom; transfer-syntax={stored.transfer_syntax_uid}"
        )
        assert int(part.headers["content-length"]) == len(stored.data)
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    assert response.headers["etag"]

    series = _parts(
        await client.get(f"/dicom-web/studies/{STUDY}/series/{SERIES_B}", headers={"accept": ALL_AS_STORED})
    )
    assert [p.content for p in series] == [study[2].data]

    instance = _parts(
        await client.get(
            f"/dicom-web/studies/{STUDY}/series/{SERIES_A}/instances/{SERIES_A}.2",
            headers={"accept": ALL_AS_STORED},
        )
    )
    assert [p.content for p in instance] == [study[1].data]


async def test_default_is_explicit_vr_little_endian_transcoding_when_stored_otherwise(
    client: httpx.AsyncClient, rle_instance: StoredInstance
) -> None:
    url = (
        f"/dicom-web/studies/{rle_instance.study_instance_uid}/series/{rle_instance.series_instance_uid}"
        f"/instances/{rle_instance.sop_instance_uid}"
    )
    for accept in (None, 'multipart/related; type="application/dicom"'):
        headers = {"accept": accept} if accept else {}
        [part] = _parts(await client.get(url, headers=headers))
        assert part.headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
        sent = dcmread(io.BytesIO(part.content))
        original = dcmread(io.BytesIO(rle_instance.data))
        assert sent.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert sent.SOPInstanceUID == rle_instance.sop_instance_uid
        assert np.array_equal(sent.pixel_array, original.pixel_array)

    [as_stored] = _parts(await client.get(url, headers={"accept": ALL_AS_STORED}))
    assert as_stored.content == rle_instance.data


async def test_a_named_lossless_syntax_is_produced(
    client: httpx.AsyncClient, study: list[StoredInstance]
) -> None:
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={RLELossless}'
    [part] = _parts(
        await client.get(f"/dicom-web/studies/{STUDY}/series/{SERIES_B}", headers={"accept": accept})
    )
    assert part.headers["content-type"] == f"application/dicom; transfer-syntax={RLELossless}"
    sent = dcmread(io.BytesIO(part.content))
    assert sent.file_meta.TransferSyntaxUID == RLELossless
    original = dcmread(io.BytesIO(study[2].data))
    assert np.array_equal(sent.pixel_array, original.pixel_array)


async def test_the_first_producible_of_several_accepted_syntaxes_wins(
    client: httpx.AsyncClient, study: list[StoredInstance]
) -> None:
    accept = (
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}, '
        f'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5'
    )
    [part] = _parts(
        await client.get(f"/dicom-web/studies/{STUDY}/series/{SERIES_B}", headers={"accept": accept})
    )
    assert part.content == study[2].data


@pytest.mark.parametrize(
    "accept",
    [
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}',
        "application/json",
        'multipart/related; type="application/octet-stream"',
    ],
)
async def test_unproducible_requests_are_406(
    client: httpx.AsyncClient, study: list[StoredInstance], accept: str
) -> None:
    response = await client.get(f"/dicom-web/studies/{STUDY}", headers={"accept": accept})
    assert response.status_code == 406
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1.2.3.999",
        f"/studies/{STUDY}/series/1.2.3.999",
        f"/studies/{STUDY}/series/{SERIES_A}/instances/{SERIES_B}.1",
        "/studies/1.2.3.999/metadata",
        f"/studies/{STUDY}/series/{SERIES_A}/instances/1.2.3.999/metadata",
    ],
)
async def test_nothing_matching_is_404(
    client: httpx.AsyncClient, study: list[StoredInstance], path: str
) -> None:
    response = await client.get(
        f"/dicom-web{path}", headers={"accept": ALL_AS_STORED + ", application/dicom+json"}
    )
    assert response.status_code == 404


async def test_etag_and_if_none_match(client: httpx.AsyncClient, study: list[StoredInstance]) -> None:
    url = f"/dicom-web/studies/{STUDY}"
    first = await client.get(url, headers={"accept": ALL_AS_STORED})
    tag = first.headers["etag"]
    again = await client.get(url, headers={"accept": ALL_AS_STORED, "if-none-match": tag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == tag
    other = await client.get(url, headers={"accept": ALL_AS_STORED, "if-none-match": '"other"'})
    assert other.status_code == 200

    series_tag = (await client.get(f"{url}/series/{SERIES_A}", headers={"accept": ALL_AS_STORED})).headers[
        "etag"
    ]
    assert series_tag != tag

    metadata = await client.get(f"{url}/metadata")
    metadata_tag = metadata.headers["etag"]
    assert (await client.get(f"{url}/metadata", headers={"if-none-match": metadata_tag})).status_code == 304
    assert (
        await client.get(f"{url}/metadata", headers={"if-none-match": f"W/{metadata_tag}"})
    ).status_code == 304


def _pixel_uri(metadata: dict[str, Any]) -> str:
    uri: str = metadata["7FE00010"]["BulkDataURI"]
    return uri


async def test_metadata_at_every_level_with_absolute_bulk_data_uris(
    client: httpx.AsyncClient, study: list[StoredInstance]
) -> None:
    response = await client.get(f"/dicom-web/studies/{STUDY}/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    everything = response.json()
    assert [m["00080018"]["Value"][0] for m in everything] == [s.sop_instance_uid for s in study]
    first = everything[0]
    assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}
    assert first["00280010"] == {"vr": "US", "Value": [8]}
    assert "Value" not in first["7FE00010"]
    assert (
        _pixel_uri(first)
        == f"{BASE}/studies/{STUDY}/series/{SERIES_A}/instances/{SERIES_A}.1/bulkdata/7FE00010"
    )

    series = (await client.get(f"/dicom-web/studies/{STUDY}/series/{SERIES_B}/metadata")).json()
    assert [m["00080018"]["Value"][0] for m in series] == [f"{SERIES_B}.1"]
    assert _pixel_uri(series[0]).endswith(f"/series/{SERIES_B}/instances/{SERIES_B}.1/bulkdata/7FE00010")

    one = (
        await client.get(f"/dicom-web/studies/{STUDY}/series/{SERIES_A}/instances/{SERIES_A}.2/metadata")
    ).json()
    assert len(one) == 1
    assert one[0]["00200013"] == {"vr": "IS", "Value": [2]}


async def test_retrieval_needs_credentials(client: httpx.AsyncClient, study: list[StoredInstance]) -> None:
    response = await client.get(f"/dicom-web/studies/{STUDY}/metadata", headers={ROLES_HEADER: "viewer"})
    assert response.status_code == 200
    request = client.build_request("GET", f"/dicom-web/studies/{STUDY}")
    del request.headers[ROLES_HEADER]
    assert (await client.send(request)).status_code == 401


async def test_capabilities_describe_what_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/dicom-web/capabilities")
    assert response.status_code == 200
    described = response.json()
    resources = {r["path"]: r for r in described["resources"]}
    assert resources["/studies"]["media_types"] == ["application/dicom+json"]
    assert "includefield" in resources["/studies"]["query_parameters"]
    assert "GET" in resources["/studies/{study}/series/{series}/instances/{instance}"]["methods"]
    assert resources["/studies/{study}/metadata"]["media_types"] == ["application/dicom+json"]
    syntaxes = described["wado"]["transfer_syntaxes"]
    assert syntaxes["default"] == ExplicitVRLittleEndian
    assert RLELossless in syntaxes["converted_to"]
    options = await client.options("/dicom-web")
    assert options.status_code == 200
    assert options.json() == described
    assert "OPTIONS" in options.headers["allow"]


async def test_dicomweb_client_searches_and_retrieves(live_server: str, study: list[StoredInstance]) -> None:
    session = requests.Session()
    session.headers[ROLES_HEADER] = "viewer"
    web = DICOMwebClient(url=f"{live_server}/dicom-web", session=session)

    studies = await asyncio.to_thread(web.search_for_studies, search_filters={"PatientID": "P1"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [STUDY]
    series = await asyncio.to_thread(web.search_for_series, STUDY)
    assert sorted(s["0020000E"]["Value"][0] for s in series) == [SERIES_A, SERIES_B]

    retrieved = await asyncio.to_thread(web.retrieve_study, STUDY)
    assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(s.sop_instance_uid for s in study)
    by_uid = {ds.SOPInstanceUID: ds for ds in retrieved}
    for stored in study:
        original = dcmread(io.BytesIO(stored.data))
        assert by_uid[stored.sop_instance_uid].PixelData == original.PixelData

    metadata = await asyncio.to_thread(web.retrieve_instance_metadata, STUDY, SERIES_B, f"{SERIES_B}.1")
    assert metadata["00080018"]["Value"] == [f"{SERIES_B}.1"]
    assert metadata["7FE00010"]["BulkDataURI"].startswith(f"{live_server}/dicom-web/studies/{STUDY}/")
    session.close()
