"""WADO-RS frames and bulk data against real stored objects (PS3.18 10.4)."""

from __future__ import annotations

import asyncio
import copy
import io
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from dicomweb_api import frames
from dicomweb_api.ranges import ByteRange, RangeNotSatisfiableError, parse_range
from dicomweb_api.testing import ROLES_HEADER, Store, StoredInstance, parse_multipart, part10_bytes
from pacs_common.storage import ObjectStorage
from pacs_common.storage.s3 import S3Storage

OCTET = 'multipart/related; type="application/octet-stream"'
AS_STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(str(path))


def _url(stored: StoredInstance, suffix: str) -> str:
    return (
        f"/dicom-web/studies/{stored.study_instance_uid}/series/{stored.series_instance_uid}"
        f"/instances/{stored.sop_instance_uid}/{suffix}"
    )


async def _frames(client: httpx.AsyncClient, stored: StoredInstance, frames: str, accept: str) -> list[bytes]:
    response = await client.get(_url(stored, f"frames/{frames}"), headers={"Accept": accept})
    assert response.status_code == 200, response.text
    return [part.content for part in parse_multipart(response.headers["content-type"], response.content)]


async def test_uncompressed_frame_is_the_stored_pixel_data(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    response = await client.get(_url(ct, "frames/1"), headers={"Accept": OCTET})

    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related")
    assert 'type="application/octet-stream"' in content_type
    [part] = parse_multipart(content_type, response.content)
    assert part.headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert part.content == dcmread(_file("CT_small.dcm")).PixelData
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"
    assert response.headers["etag"]


async def test_listed_frames_of_a_multiframe_in_the_order_asked(
    client: httpx.AsyncClient, store: Store
) -> None:
    [dose] = await store([_file("rtdose.dcm")])  # 15 frames, Implicit VR Little Endian, 32 bit
    pixels = dcmread(_file("rtdose.dcm")).pixel_array

    parts = await _frames(client, dose, "5,2,15", OCTET)

    assert parts == [pixels[4].tobytes(), pixels[1].tobytes(), pixels[14].tobytes()]


async def test_many_frames_are_streamed_batch_by_batch(
    client: httpx.AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frames, "_FRAMES_PER_READ", 2)
    [dose] = await store([_file("rtdose.dcm")])
    pixels = dcmread(_file("rtdose.dcm")).pixel_array

    response = await client.get(_url(dose, "frames/1,2,3,4,15"), headers={"Accept": OCTET})

    parts = parse_multipart(response.headers["content-type"], response.content)
    assert [part.content for part in parts] == [pixels[i].tobytes() for i in (0, 1, 2, 3, 14)]
    assert [part.headers["content-location"].rsplit("/", 1)[1] for part in parts] == [
        "1",
        "2",
        "3",
        "4",
        "15",
    ]


async def test_big_endian_frames_are_sent_little_endian(client: httpx.AsyncClient, store: Store) -> None:
    [big] = await store([_file("MR_small_bigendian.dcm")])

    [frame] = await _frames(client, big, "1", OCTET)

    assert frame == dcmread(_file("MR_small.dcm")).PixelData


@pytest.mark.parametrize("frames", ["0", "16", "1,16"])
async def test_frame_numbers_out_of_range_are_404(
    client: httpx.AsyncClient, store: Store, frames: str
) -> None:
    [dose] = await store([_file("rtdose.dcm")])
    response = await client.get(_url(dose, f"frames/{frames}"), headers={"Accept": OCTET})
    assert response.status_code == 404
    assert "frame" in response.json()["detail"]


async def test_bad_frame_list_is_400_and_unknown_instance_404(
    client: httpx.AsyncClient, store: Store
) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    assert (await client.get(_url(ct, "frames/1,x"))).status_code == 400
    unknown = _url(ct, "frames/1").replace(ct.sop_instance_uid, "1.2.3.999")
    assert (await client.get(unknown)).status_code == 404


async def test_compressed_frame_as_stored_with_transfer_syntax_star(
    client: httpx.AsyncClient, store: Store
) -> None:
    [jls] = await store([_file("MR_small_jpeg_ls_lossless.dcm")])
    response = await client.get(_url(jls, "frames/1"), headers={"Accept": AS_STORED})

    assert response.status_code == 200
    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.80"
    expected = next(
        generate_frames(dcmread(_file("MR_small_jpeg_ls_lossless.dcm")).PixelData, number_of_frames=1)
    )
    assert part.content == expected
    assert part.content[:2] == b"\xff\xd8"  # a JPEG-LS codestream, not decoded pixels


async def test_compressed_frame_by_its_image_media_type(client: httpx.AsyncClient, store: Store) -> None:
    [jls] = await store([_file("MR_small_jpeg_ls_lossless.dcm")])
    response = await client.get(
        _url(jls, "frames/1"), headers={"Accept": 'multipart/related; type="image/jls"'}
    )

    assert response.status_code == 200
    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.headers["content-type"].startswith("image/jls")
    assert 'type="image/jls"' in response.headers["content-type"]


async def test_compressed_frame_decompressed_when_uncompressed_is_asked(
    client: httpx.AsyncClient, store: Store
) -> None:
    [jls] = await store([_file("MR_small_jpeg_ls_lossless.dcm")])

    [frame] = await _frames(client, jls, "1", OCTET)

    # Lossless: the decompressed pixels are those of the uncompressed original.
    assert frame == dcmread(_file("MR_small.dcm")).PixelData


async def test_transcoding_to_another_compression_is_406(client: httpx.AsyncClient, store: Store) -> None:
    [jls] = await store([_file("MR_small_jpeg_ls_lossless.dcm")])
    response = await client.get(
        _url(jls, "frames/1"), headers={"Accept": 'multipart/related; type="image/jp2"'}
    )
    assert response.status_code == 406
    assert "1.2.840.10008.1.2.4.80" in response.json()["detail"]


async def test_frames_of_a_compressed_multiframe(client: httpx.AsyncClient, store: Store) -> None:
    [ybr] = await store([_file("examples_ybr_color.dcm")])  # JPEG baseline, 30 frames
    stored = list(generate_frames(dcmread(_file("examples_ybr_color.dcm")).PixelData, number_of_frames=30))

    parts = await _frames(client, ybr, "3,30", AS_STORED)

    assert parts == [stored[2], stored[29]]


def _fragmented_copy(name: str, frames: int) -> tuple[Dataset, list[bytes]]:
    """The first ``frames`` frames of a compressed multi-frame, re-encapsulated
    with two fragments per frame and a Basic Offset Table, under new UIDs."""
    ds = dcmread(_file(name))
    originals = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))[:frames]
    copied = copy.deepcopy(ds)
    copied.PixelData = encapsulate(originals, fragments_per_frame=2, has_bot=True)
    copied.NumberOfFrames = frames
    copied.StudyInstanceUID = generate_uid()
    copied.SeriesInstanceUID = generate_uid()
    copied.SOPInstanceUID = generate_uid()
    copied.file_meta.MediaStorageSOPInstanceUID = copied.SOPInstanceUID
    return copied, originals


async def test_frames_spread_over_fragments_are_joined(client: httpx.AsyncClient, store: Store) -> None:
    ds, originals = _fragmented_copy("examples_ybr_color.dcm", 3)
    [stored] = await store([part10_bytes(ds)])

    parts = await _frames(client, stored, "2,3", AS_STORED)

    assert parts == [originals[1], originals[2]]


async def test_if_none_match_gives_304(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    first = await client.get(_url(ct, "frames/1"), headers={"Accept": OCTET})
    etag = first.headers["etag"]

    again = await client.get(_url(ct, "frames/1"), headers={"Accept": OCTET, "If-None-Match": etag})
    other_form = await client.get(_url(ct, "frames/1"), headers={"Accept": "application/octet-stream"})

    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert other_form.status_code == 200
    assert other_form.headers["etag"] != etag


async def test_single_part_frame_when_asked(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    response = await client.get(_url(ct, "frames/1"), headers={"Accept": "application/octet-stream"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/octet-stream")
    assert response.content == dcmread(_file("CT_small.dcm")).PixelData


async def test_frames_need_the_read_permission(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    response = await client.get(_url(ct, "frames/1"), headers={ROLES_HEADER: ""})
    assert response.status_code == 403
    viewer = await client.get(_url(ct, "frames/1"), headers={ROLES_HEADER: "viewer"})
    assert viewer.status_code == 200


# ---------------------------------------------------------------------------
# Bulk data


async def test_bulk_data_value_as_multipart(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    expected = dcmread(_file("CT_small.dcm"))[0x00431029].value  # a private OB value over the threshold

    response = await client.get(_url(ct, "bulkdata/00431029"))

    assert response.status_code == 200
    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.headers["content-type"] == "application/octet-stream"
    assert part.content == expected
    assert response.headers["accept-ranges"] == "bytes"


async def test_bulk_data_range_single_part(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    pixels = dcmread(_file("CT_small.dcm")).PixelData
    accept = {"Accept": "application/octet-stream"}

    ranged = await client.get(_url(ct, "bulkdata/7FE00010"), headers=accept | {"Range": "bytes=100-199"})
    suffix = await client.get(_url(ct, "bulkdata/7FE00010"), headers=accept | {"Range": "bytes=-10"})
    whole = await client.get(_url(ct, "bulkdata/7FE00010"), headers=accept)

    assert ranged.status_code == 206
    assert ranged.headers["content-range"] == f"bytes 100-199/{len(pixels)}"
    assert ranged.content == pixels[100:200]
    assert suffix.status_code == 206
    assert suffix.content == pixels[-10:]
    assert whole.status_code == 200
    assert whole.content == pixels


async def test_bulk_data_range_in_a_multipart_response(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    pixels = dcmread(_file("CT_small.dcm")).PixelData

    response = await client.get(_url(ct, "bulkdata/7FE00010"), headers={"Range": "bytes=32000-"})

    assert response.status_code == 206
    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.content == pixels[32000:]
    assert part.headers["content-range"] == f"bytes 32000-{len(pixels) - 1}/{len(pixels)}"


async def test_bulk_data_range_beyond_the_value_is_416(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    response = await client.get(_url(ct, "bulkdata/7FE00010"), headers={"Range": "bytes=40000-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */32768"


async def test_bulk_data_inside_a_sequence(client: httpx.AsyncClient, store: Store) -> None:
    ds = dcmread(_file("CT_small.dcm"))
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel, icon.BitsAllocated = 40, 50, 1, 8
    icon.PixelData = bytes(np.arange(2000, dtype=np.uint32) % 251)
    ds.IconImageSequence = [icon]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    [stored] = await store([part10_bytes(ds)])

    response = await client.get(_url(stored, "bulkdata/00880200/0/7FE00010"), headers={"Accept": "*/*"})

    assert response.status_code == 200
    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.content == icon.PixelData


async def test_unknown_bulk_data_is_404(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    assert (await client.get(_url(ct, "bulkdata/00100010"))).status_code == 404
    assert (await client.get(_url(ct, "bulkdata/not-a-tag"))).status_code == 404


async def test_encapsulated_pixel_data_as_bulk_data_is_the_codestream(
    client: httpx.AsyncClient, store: Store
) -> None:
    [jls] = await store([_file("MR_small_jpeg_ls_lossless.dcm")])
    expected = next(
        generate_frames(dcmread(_file("MR_small_jpeg_ls_lossless.dcm")).PixelData, number_of_frames=1)
    )

    response = await client.get(_url(jls, "bulkdata/7FE00010"), headers={"Accept": AS_STORED})

    assert response.status_code == 200
    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.80"
    assert part.content == expected


# ---------------------------------------------------------------------------
# A real client


async def test_dicomweb_client_retrieves_frames_bulk_data_and_rendered(
    live_server: str, store: Store
) -> None:
    [ct, jls] = await store([_file("CT_small.dcm"), _file("MR_small_jpeg_ls_lossless.dcm")])
    session = requests.Session()
    session.headers[ROLES_HEADER] = "viewer"
    web = DICOMwebClient(url=f"{live_server}/dicom-web", session=session)
    ct_uids = (ct.study_instance_uid, ct.series_instance_uid, ct.sop_instance_uid)
    jls_uids = (jls.study_instance_uid, jls.series_instance_uid, jls.sop_instance_uid)

    native = await asyncio.to_thread(web.retrieve_instance_frames, *ct_uids, frame_numbers=[1])
    as_stored = await asyncio.to_thread(
        web.retrieve_instance_frames,
        *jls_uids,
        frame_numbers=[1],
        media_types=(("application/octet-stream", "*"),),
    )
    metadata = await asyncio.to_thread(web.retrieve_instance_metadata, *ct_uids)
    bulk = await asyncio.to_thread(web.retrieve_bulkdata, metadata["7FE00010"]["BulkDataURI"])
    rendered = await asyncio.to_thread(web.retrieve_instance_rendered, *ct_uids, media_types=("image/png",))
    session.close()

    pixels = dcmread(_file("CT_small.dcm")).PixelData
    assert native == [pixels]
    expected = next(
        generate_frames(dcmread(_file("MR_small_jpeg_ls_lossless.dcm")).PixelData, number_of_frames=1)
    )
    assert as_stored == [expected]
    assert bulk == [pixels]
    assert Image.open(io.BytesIO(rendered)).size == (128, 128)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", ByteRange(0, 10, 100)),
        ("bytes=90-", ByteRange(90, 10, 100)),
        ("bytes=95-200", ByteRange(95, 5, 100)),
        ("bytes=-30", ByteRange(70, 30, 100)),
        ("bytes=-300", ByteRange(0, 100, 100)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole value
        ("items=0-1", None),
        ("bytes=9-3", None),
    ],
)
def test_range_header(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0"])
def test_unsatisfiable_range(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, 100)


async def test_accept_preference_and_unquoted_type(client: httpx.AsyncClient, store: Store) -> None:
    [jls] = await store([_file("MR_small_jpeg_ls_lossless.dcm")])
    prefer_stored = (
        'multipart/related; type="application/octet-stream"; q=0.5, '
        "multipart/related; type=application/octet-stream; transfer-syntax=*"
    )

    response = await client.get(_url(jls, "frames/1"), headers={"Accept": prefer_stored})

    [part] = parse_multipart(response.headers["content-type"], response.content)
    assert part.headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.4.80")


# ---------------------------------------------------------------------------
# Object storage, indexed as the ingest worker indexes it there (fragments of
# encapsulated pixel data not listed: frames are located with ranged reads).


async def _forget_fragments(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection:
        await connection.execute(
            "UPDATE instance_metadata SET bulk_data = bulk_data #- '{7FE00010,fragments}'"
        )


class TestOnS3:
    @pytest.fixture
    def hot_storage(self, s3_storage: S3Storage) -> ObjectStorage:
        return s3_storage

    async def test_native_frames_and_ranges(self, client: httpx.AsyncClient, store: Store) -> None:
        [dose, ct] = await store([_file("rtdose.dcm"), _file("CT_small.dcm")])
        pixels = dcmread(_file("rtdose.dcm")).pixel_array

        frames = await _frames(client, dose, "15,1", OCTET)
        ranged = await client.get(
            _url(ct, "bulkdata/7FE00010"),
            headers={"Accept": "application/octet-stream", "Range": "bytes=10-19"},
        )

        assert frames == [pixels[14].tobytes(), pixels[0].tobytes()]
        assert ranged.status_code == 206
        assert ranged.content == dcmread(_file("CT_small.dcm")).PixelData[10:20]

    async def test_compressed_frames_without_a_fragment_list(
        self, client: httpx.AsyncClient, store: Store, db_pool: asyncpg.Pool
    ) -> None:
        fragmented, originals = _fragmented_copy("examples_ybr_color.dcm", 3)
        [ybr, jls, split] = await store(
            [
                _file("examples_ybr_color.dcm"),
                _file("MR_small_jpeg_ls_lossless.dcm"),
                part10_bytes(fragmented),
            ]
        )
        await _forget_fragments(db_pool)
        ybr_frames = list(
            generate_frames(dcmread(_file("examples_ybr_color.dcm")).PixelData, number_of_frames=30)
        )
        jls_frame = next(
            generate_frames(dcmread(_file("MR_small_jpeg_ls_lossless.dcm")).PixelData, number_of_frames=1)
        )

        assert await _frames(client, ybr, "1,17,30", AS_STORED) == [
            ybr_frames[0],
            ybr_frames[16],
            ybr_frames[29],
        ]
        assert await _frames(client, jls, "1", AS_STORED) == [jls_frame]
        assert await _frames(client, split, "3,1", AS_STORED) == [originals[2], originals[0]]
        bulk = await client.get(
            _url(jls, "bulkdata/7FE00010"), headers={"Accept": "application/octet-stream"}
        )
        assert bulk.content == jls_frame
        _, image = await _rendered_png(client, jls)
        assert image.size == (64, 64)

    async def test_no_offset_table_falls_back_to_reading_the_object(
        self, client: httpx.AsyncClient, store: Store, db_pool: asyncpg.Pool
    ) -> None:
        ds = dcmread(_file("examples_ybr_color.dcm"))
        originals = list(generate_frames(ds.PixelData, number_of_frames=30))[:4]
        ds.PixelData = encapsulate(originals, fragments_per_frame=2, has_bot=False)
        ds.NumberOfFrames = 4
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        [stored] = await store([part10_bytes(ds)])
        await _forget_fragments(db_pool)

        assert await _frames(client, stored, "4,2", AS_STORED) == [originals[3], originals[1]]


async def _rendered_png(
    client: httpx.AsyncClient, stored: StoredInstance
) -> tuple[httpx.Response, Image.Image]:
    response = await client.get(_url(stored, "rendered"), headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    return response, Image.open(io.BytesIO(response.content))
