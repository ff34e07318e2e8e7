"""WADO-RS rendered images and thumbnails against real stored objects
(PS3.18 8.3.5, 10.4): what a viewer shows."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import generate_uid

from dicomweb_api.testing import Store, StoredInstance, part10_bytes

PNG = {"Accept": "image/png"}


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


def _copy(name: str, **changes: Any) -> bytes:
    """A test file as a new instance (new UIDs) with some attributes changed."""
    ds: Dataset = copy.deepcopy(dcmread(_file(name)))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return part10_bytes(ds)


async def _image(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None, **params: str
) -> tuple[httpx.Response, Image.Image]:
    response = await client.get(url, headers=headers or {}, params=params)
    assert response.status_code == 200, response.text
    return response, Image.open(io.BytesIO(response.content))


def _pixels(image: Image.Image) -> npt.NDArray[Any]:
    return np.asarray(image)


async def test_rendered_is_a_jpeg_of_the_image_by_default(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])

    response, image = await _image(client, _url(ct, "rendered"))

    assert response.headers["content-type"] == "image/jpeg"
    assert image.format == "JPEG"
    assert image.size == (128, 128)
    assert image.mode == "L"
    assert response.headers["cross-origin-resource-policy"] == "cross-origin"


async def test_png_by_accept_and_viewport_size(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])

    response, image = await _image(client, _url(ct, "rendered"), PNG, viewport="64,64")
    _, by_parameter = await _image(client, _url(ct, "rendered"), None, accept="image/png", viewport="200,200")

    assert response.headers["content-type"] == "image/png"
    assert image.format == "PNG"
    assert image.size == (64, 64)
    assert by_parameter.format == "PNG"
    assert by_parameter.size == (200, 200)


async def test_window_changes_the_pixels(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    url = _url(ct, "rendered")

    _, default = await _image(client, url, PNG)
    _, soft_tissue = await _image(client, url, PNG, window="40,400")
    _, above_all = await _image(client, url, PNG, window="5000,10")
    _, below_all = await _image(client, url, PNG, window="-5000,10,linear")

    # No stored window: the pixel range spans black to white.
    assert _pixels(default).min() == 0
    assert _pixels(default).max() == 255
    assert not np.array_equal(_pixels(default), _pixels(soft_tissue))
    assert (_pixels(above_all) == 0).all()  # every CT value is below the window: black
    assert (_pixels(below_all) == 255).all()  # every CT value is above it: white


async def test_rescale_is_applied_before_the_window(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])  # RescaleIntercept -1024
    [shifted] = await store([_copy("CT_small.dcm", RescaleIntercept=-24)])

    _, original = await _image(client, _url(ct, "rendered"), PNG, window="40,400")
    _, moved = await _image(client, _url(shifted, "rendered"), PNG, window="1040,400")

    assert np.array_equal(_pixels(original), _pixels(moved))


async def test_stored_window_is_the_default(client: httpx.AsyncClient, store: Store) -> None:
    [mr] = await store([_file("MR_small.dcm")])  # WindowCenter 600, WindowWidth 1600
    url = _url(mr, "rendered")

    _, default = await _image(client, url, PNG)
    _, stored_window = await _image(client, url, PNG, window="600,1600")
    _, other_window = await _image(client, url, PNG, window="300,200")

    assert np.array_equal(_pixels(default), _pixels(stored_window))
    assert not np.array_equal(_pixels(default), _pixels(other_window))


async def test_monochrome1_is_inverted(client: httpx.AsyncClient, store: Store) -> None:
    [mono2] = await store([_file("CT_small.dcm")])
    [mono1] = await store([_copy("CT_small.dcm", PhotometricInterpretation="MONOCHROME1")])

    _, normal = await _image(client, _url(mono2, "rendered"), PNG, window="40,400")
    _, inverted = await _image(client, _url(mono1, "rendered"), PNG, window="40,400")

    difference = np.abs(255 - _pixels(normal).astype(int) - _pixels(inverted).astype(int))
    assert difference.max() <= 1


async def test_rgb_is_rendered_in_color_and_fitted_to_the_viewport(
    client: httpx.AsyncClient, store: Store
) -> None:
    [rgb] = await store([_file("examples_rgb_color.dcm")])  # 320 x 240
    expected = dcmread(_file("examples_rgb_color.dcm")).pixel_array

    _, full = await _image(client, _url(rgb, "rendered"), PNG)
    _, fitted = await _image(client, _url(rgb, "rendered"), PNG, viewport="160,160")

    assert full.mode == "RGB"
    assert np.array_equal(_pixels(full), expected)
    assert fitted.size == (160, 120)  # aspect ratio kept


async def test_compressed_image_renders_like_its_uncompressed_original(
    client: httpx.AsyncClient, store: Store
) -> None:
    [native, jls] = await store([_file("MR_small.dcm"), _file("MR_small_jpeg_ls_lossless.dcm")])

    _, from_native = await _image(client, _url(native, "rendered"), PNG)
    _, from_jls = await _image(client, _url(jls, "rendered"), PNG)

    assert np.array_equal(_pixels(from_native), _pixels(from_jls))


async def test_multiframe_instance_rendered_is_the_first_frame(
    client: httpx.AsyncClient, store: Store
) -> None:
    [ybr] = await store([_file("examples_ybr_color.dcm")])  # JPEG baseline, 30 frames

    _, instance = await _image(client, _url(ybr, "rendered"), PNG)
    _, first = await _image(client, _url(ybr, "frames/1/rendered"), PNG)
    _, last = await _image(client, _url(ybr, "frames/30/rendered"), PNG)
    missing = await client.get(_url(ybr, "frames/31/rendered"))

    assert instance.mode == "RGB"
    assert np.array_equal(_pixels(instance), _pixels(first))
    assert not np.array_equal(_pixels(first), _pixels(last))
    assert missing.status_code == 404


async def test_thumbnail_is_small(client: httpx.AsyncClient, store: Store) -> None:
    [rgb, ybr] = await store([_file("examples_rgb_color.dcm"), _file("examples_ybr_color.dcm")])

    response, thumbnail = await _image(client, _url(rgb, "thumbnail"))
    _, frame_thumbnail = await _image(client, _url(ybr, "frames/2/thumbnail"), PNG)
    _, sized = await _image(client, _url(rgb, "thumbnail"), None, viewport="64,64")

    assert response.headers["content-type"] == "image/jpeg"
    assert thumbnail.size == (128, 96)
    assert frame_thumbnail.size == (128, 96)
    assert sized.size == (64, 48)


async def test_etag_and_if_none_match(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    url = _url(ct, "rendered")

    first = await client.get(url, params={"window": "40,400"})
    cached = await client.get(
        url, params={"window": "40,400"}, headers={"If-None-Match": first.headers["etag"]}
    )
    other = await client.get(
        url, params={"window": "50,400"}, headers={"If-None-Match": first.headers["etag"]}
    )

    assert cached.status_code == 304
    assert cached.content == b""
    assert other.status_code == 200
    assert other.headers["etag"] != first.headers["etag"]


async def test_quality_changes_the_jpeg(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    low = await client.get(_url(ct, "rendered"), params={"quality": "5"})
    high = await client.get(_url(ct, "rendered"), params={"quality": "100"})
    assert low.status_code == high.status_code == 200
    assert len(low.content) < len(high.content)


@pytest.mark.parametrize(
    ("params", "headers", "status"),
    [
        ({"window": "40"}, {}, 400),
        ({"window": "40,0"}, {}, 400),
        ({"window": "40,400,cubic"}, {}, 400),
        ({"viewport": "0,10"}, {}, 400),
        ({"viewport": "a,b"}, {}, 400),
        ({"quality": "0"}, {}, 422),
        ({}, {"Accept": "image/gif"}, 406),
    ],
)
async def test_bad_requests(
    client: httpx.AsyncClient, store: Store, params: dict[str, str], headers: dict[str, str], status: int
) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    response = await client.get(_url(ct, "rendered"), params=params, headers=headers)
    assert response.status_code == status


async def test_unknown_instance_and_non_image_are_404(client: httpx.AsyncClient, store: Store) -> None:
    [ct] = await store([_file("CT_small.dcm")])
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.SOPInstanceUID = generate_uid()
    report.StudyInstanceUID = ct.study_instance_uid
    report.SeriesInstanceUID = generate_uid()
    report.Modality = "SR"
    report.file_meta = copy.deepcopy(dcmread(_file("CT_small.dcm")).file_meta)
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    [sr] = await store([report])

    unknown = await client.get(_url(ct, "rendered").replace(ct.sop_instance_uid, "1.2.3.4"))
    not_image = await client.get(_url(sr, "rendered"))

    assert unknown.status_code == 404
    assert not_image.status_code == 404


async def test_palette_color_is_rendered_through_its_lookup_tables(
    client: httpx.AsyncClient, store: Store
) -> None:
    [palette] = await store([_file("examples_palette.dcm")])
    ds = dcmread(_file("examples_palette.dcm"))
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)  # 16-bit entries to 8 bits

    _, image = await _image(client, _url(palette, "rendered"), PNG)

    assert image.mode == "RGB"
    assert np.array_equal(_pixels(image), expected)
