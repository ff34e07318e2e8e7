"""Frames, bulk values and rendered images of stored instances.

Everything here is blocking (storage reads, decoding, encoding): the routes
call it through ``asyncio.to_thread``.

Where a value lies in the stored object comes from the index
(``instance_metadata.bulk_data``: offset and length, or the fragments of
encapsulated Pixel Data), so a frame costs one ranged read of its own bytes,
whatever the size of the object.  Only when the index could not locate the
value (deflated objects, encapsulated data whose fragments were not listed
or do not map to frames without parsing) is the object read whole, into a
spooled temporary file, and handed to pydicom.
"""

from __future__ import annotations

import base64
import io
import math
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, ConfigDict
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.processing import apply_color_lut
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from pacs_common.dicom.transcode import can_decode
from pacs_common.storage import ObjectStorage

__all__ = [
    "PALETTE_DATA_TAGS",
    "PIXEL_DATA_TAGS",
    "PIXEL_ELEMENTS",
    "FrameNotFoundError",
    "ImageFormat",
    "NotAnImageError",
    "Palette",
    "PixelInfo",
    "RenderParams",
    "StoredValue",
    "UnsupportedPixelDataError",
    "VoiFunction",
    "Window",
    "apply_palette",
    "decode_frame",
    "decoded_bytes",
    "media_type_of_syntax",
    "native_little_endian",
    "read_frames",
    "read_palette",
    "read_value",
    "render_image",
]

#: Pixel Data, Float Pixel Data, Double Float Pixel Data (as BulkDataURI paths).
PIXEL_DATA_TAGS: Final = ("7FE00010", "7FE00008", "7FE00009")
_PIXEL_KEYWORDS: Final = {
    "7FE00010": "PixelData",
    "7FE00008": "FloatPixelData",
    "7FE00009": "DoubleFloatPixelData",
}

_SAMPLES_PER_PIXEL = "00280002"
_PHOTOMETRIC = "00280004"
_PLANAR_CONFIGURATION = "00280006"
_NUMBER_OF_FRAMES = "00280008"
_ROWS = "00280010"
_COLUMNS = "00280011"
_BITS_ALLOCATED = "00280100"
_BITS_STORED = "00280101"
_HIGH_BIT = "00280102"
_PIXEL_REPRESENTATION = "00280103"
_WINDOW_CENTER = "00281050"
_WINDOW_WIDTH = "00281051"
_RESCALE_INTERCEPT = "00281052"
_RESCALE_SLOPE = "00281053"
_VOI_LUT_FUNCTION = "00281056"
_PALETTE_DESCRIPTORS: Final = ("00281101", "00281102", "00281103")
#: Red, Green, Blue Palette Color Lookup Table Data: inline in the metadata, or bulk data.
PALETTE_DATA_TAGS: Final = ("00281201", "00281202", "00281203")
_PALETTE_KEYWORDS: Final = ("Red", "Green", "Blue")

#: The metadata elements this module reads (a route fetches only these).
PIXEL_ELEMENTS: Final = (
    _SAMPLES_PER_PIXEL,
    _PHOTOMETRIC,
    _PLANAR_CONFIGURATION,
    _NUMBER_OF_FRAMES,
    _ROWS,
    _COLUMNS,
    _BITS_ALLOCATED,
    _BITS_STORED,
    _HIGH_BIT,
    _PIXEL_REPRESENTATION,
    _WINDOW_CENTER,
    _WINDOW_WIDTH,
    _RESCALE_INTERCEPT,
    _RESCALE_SLOPE,
    _VOI_LUT_FUNCTION,
    *_PALETTE_DESCRIPTORS,
    *PALETTE_DATA_TAGS,
)

# Media types of compressed frames (PS3.18 Table 8.7.3-2), by transfer syntax.
_SYNTAX_MEDIA_TYPES: Final = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_WORD_SIZES: Final = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_SPOOL_BYTES: Final = 64 * 1024 * 1024
_ITEM_TAG: Final = 0xFFFEE000
_SEQUENCE_DELIMITER_TAG: Final = 0xFFFEE0DD


class NotAnImageError(LookupError):
    """The instance has no pixel data (answer 404)."""


class FrameNotFoundError(LookupError):
    """A frame number outside 1..NumberOfFrames (answer 404)."""


class UnsupportedPixelDataError(Exception):
    """The pixel data cannot be given in the form asked for (answer 406)."""


class StoredValue(BaseModel):
    """One entry of ``instance_metadata.bulk_data`` (see
    ``pacs_common.dicom.metadata.BulkDataRef``)."""

    model_config = ConfigDict(frozen=True)

    vr: str
    offset: int | None
    length: int | None
    fragments: list[tuple[int, int]] | None = None


def _first(metadata: dict[str, Any], tag: str) -> Any:
    element = metadata.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if values else None


def _int(metadata: dict[str, Any], tag: str, default: int) -> int:
    value = _first(metadata, tag)
    try:
        return int(float(value)) if value is not None else default
    except (TypeError, ValueError):
        return default


def _float(metadata: dict[str, Any], tag: str) -> float | None:
    value = _first(metadata, tag)
    try:
        number = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


class VoiFunction(StrEnum):
    """VOI LUT Function (PS3.3 C.11.2.1.3), as the ``window`` parameter spells it."""

    LINEAR = "linear"
    LINEAR_EXACT = "linear-exact"
    SIGMOID = "sigmoid"


@dataclass(frozen=True, slots=True)
class Window:
    center: float
    width: float
    function: VoiFunction = VoiFunction.LINEAR


@dataclass(frozen=True, slots=True)
class Palette:
    """The Palette Color Lookup Tables of a PALETTE COLOR image: per channel
    (red, green, blue) its descriptor and its data, inline or where it is stored."""

    descriptors: tuple[tuple[int, int, int], ...]
    data: tuple[bytes | StoredValue, ...]

    @classmethod
    def from_index(cls, metadata: dict[str, Any], bulk_data: dict[str, Any]) -> Palette | None:
        descriptors: list[tuple[int, int, int]] = []
        data: list[bytes | StoredValue] = []
        for descriptor_tag, data_tag in zip(_PALETTE_DESCRIPTORS, PALETTE_DATA_TAGS, strict=True):
            element = metadata.get(descriptor_tag)
            values = element.get("Value") if isinstance(element, dict) else None
            if not values or len(values) != 3:
                return None
            descriptors.append((int(values[0]), int(values[1]), int(values[2])))
            inline = metadata.get(data_tag, {}).get("InlineBinary")
            if inline is not None:
                data.append(base64.b64decode(inline))
            elif data_tag in bulk_data:
                data.append(StoredValue.model_validate(bulk_data[data_tag]))
            else:
                return None
        return cls(tuple(descriptors), tuple(data))


@dataclass(frozen=True, slots=True)
class PixelInfo:
    """The pixel module of one stored instance and where its pixels are."""

    transfer_syntax: str
    pixel_tag: str
    value: StoredValue
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    pixel_representation: int
    photometric: str
    planar_configuration: int
    number_of_frames: int
    rescale_slope: float
    rescale_intercept: float
    window: Window | None
    palette: Palette | None = None

    @classmethod
    def from_index(
        cls, transfer_syntax: str, metadata: dict[str, Any], bulk_data: dict[str, Any]
    ) -> PixelInfo:
        """From the instance's metadata elements and bulk data catalogue;
        raises :class:`NotAnImageError` when there are no pixels."""
        pixel_tag = next((t for t in PIXEL_DATA_TAGS if t in bulk_data), None)
        rows = _int(metadata, _ROWS, 0)
        columns = _int(metadata, _COLUMNS, 0)
        if pixel_tag is None or rows <= 0 or columns <= 0:
            raise NotAnImageError("the instance has no pixel data")
        bits_allocated = _int(metadata, _BITS_ALLOCATED, 8)
        bits_stored = _int(metadata, _BITS_STORED, bits_allocated)
        center = _float(metadata, _WINDOW_CENTER)
        width = _float(metadata, _WINDOW_WIDTH)
        function_name = str(_first(metadata, _VOI_LUT_FUNCTION) or "LINEAR").strip().upper()
        function = {"LINEAR_EXACT": VoiFunction.LINEAR_EXACT, "SIGMOID": VoiFunction.SIGMOID}.get(
            function_name, VoiFunction.LINEAR
        )
        window = (
            Window(center, width, function)
            if center is not None and width is not None and width > 0
            else None
        )
        return cls(
            transfer_syntax=transfer_syntax,
            pixel_tag=pixel_tag,
            value=StoredValue.model_validate(bulk_data[pixel_tag]),
            rows=rows,
            columns=columns,
            samples_per_pixel=_int(metadata, _SAMPLES_PER_PIXEL, 1),
            bits_allocated=bits_allocated,
            bits_stored=bits_stored,
            high_bit=_int(metadata, _HIGH_BIT, bits_stored - 1),
            pixel_representation=_int(metadata, _PIXEL_REPRESENTATION, 0),
            photometric=str(_first(metadata, _PHOTOMETRIC) or "MONOCHROME2").strip().upper(),
            planar_configuration=_int(metadata, _PLANAR_CONFIGURATION, 0),
            number_of_frames=max(_int(metadata, _NUMBER_OF_FRAMES, 1), 1),
            rescale_slope=_float(metadata, _RESCALE_SLOPE) or 1.0,
            rescale_intercept=_float(metadata, _RESCALE_INTERCEPT) or 0.0,
            window=window,
            palette=Palette.from_index(metadata, bulk_data),
        )

    @property
    def encapsulated(self) -> bool:
        return UID(self.transfer_syntax).is_encapsulated

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame (YBR_FULL_422 stores two samples a pixel)."""
        bits = self.rows * self.columns * self.samples_per_pixel * self.bits_allocated
        return bits // 3 * 2 if self.photometric == "YBR_FULL_422" else bits

    def check_frames(self, numbers: Sequence[int]) -> None:
        for number in numbers:
            if not 1 <= number <= self.number_of_frames:
                raise FrameNotFoundError(
                    f"frame {number} does not exist (the instance has {self.number_of_frames})"
                )


def media_type_of_syntax(transfer_syntax: str) -> str | None:
    """The image media type of frames compressed in ``transfer_syntax``."""
    return _SYNTAX_MEDIA_TYPES.get(transfer_syntax)


# ---------------------------------------------------------------------------
# Reading


def _load_dataset(storage: ObjectStorage, key: str) -> Dataset:
    """The whole object, parsed (the slow path: the index did not locate the value)."""
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        with storage.open(key) as stream:
            shutil.copyfileobj(stream, spool)
        spool.seek(0)
        return dcmread(spool, force=True)  # no deferred values: nothing is read after closing


def _native_frame(storage: ObjectStorage, key: str, info: PixelInfo, index: int) -> bytes:
    offset, length = info.value.offset, info.value.length
    if offset is None or length is None:
        raise LookupError("not located")
    start_bit = index * info.frame_bits
    end_bit = start_bit + info.frame_bits
    if end_bit > length * 8:
        raise UnsupportedPixelDataError(f"the stored pixel data is too short for frame {index + 1}")
    if start_bit % 8 == 0 and end_bit % 8 == 0:
        return storage.read_range(key, offset + start_bit // 8, info.frame_bits // 8)
    # 1-bit frames that do not start on a byte boundary: bits are packed little endian.
    first_byte = start_bit // 8
    data = storage.read_range(key, offset + first_byte, (end_bit + 7) // 8 - first_byte)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    skip = start_bit - first_byte * 8
    return bytes(np.packbits(bits[skip : skip + info.frame_bits], bitorder="little").tobytes())


def _frame_fragments(storage: ObjectStorage, key: str, info: PixelInfo, index: int) -> list[tuple[int, int]]:
    """The (offset, length) of each fragment of frame ``index`` of encapsulated pixel data."""
    fragments = info.value.fragments
    if not fragments:
        return _scan_frame_fragments(storage, key, info, index)
    table, items = fragments[0], fragments[1:]
    if not items:
        raise UnsupportedPixelDataError("the encapsulated pixel data has no fragments")
    if info.number_of_frames == 1:
        return items
    if len(items) == info.number_of_frames:
        return [items[index]]
    if table[1] < 4 * info.number_of_frames:
        raise LookupError("frames not delimited without parsing")
    offsets = _basic_offsets(storage.read_range(key, table[0], table[1]))
    first_item = items[0][0] - 8
    start = offsets[index]
    end = offsets[index + 1] if index + 1 < len(offsets) else math.inf
    selected = [item for item in items if start <= item[0] - 8 - first_item < end]
    if not selected:
        raise LookupError("basic offset table does not match the fragments")
    return selected


def _basic_offsets(table: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(table) // 4}L", table[: len(table) // 4 * 4]))


def _item_header(header: bytes) -> tuple[int, int]:
    """(tag, length) of an item header in encapsulated data (always little endian)."""
    if len(header) < 8:
        raise UnsupportedPixelDataError("the encapsulated pixel data ends early")
    group, element, length = struct.unpack("<HHL", header[:8])
    return group << 16 | element, length


def _scan_items(storage: ObjectStorage, key: str, position: int, end: float) -> list[tuple[int, int]]:
    """Fragments from the item header at ``position`` up to ``end`` (or the
    sequence delimiter), one small read per item."""
    found: list[tuple[int, int]] = []
    while position < end:
        tag, length = _item_header(storage.read_range(key, position, 8))
        if tag == _SEQUENCE_DELIMITER_TAG:
            break
        if tag != _ITEM_TAG:
            raise UnsupportedPixelDataError(f"unexpected tag {tag:08X} in the encapsulated pixel data")
        found.append((position + 8, length))
        position += 8 + length
    return found


def _scan_frame_fragments(
    storage: ObjectStorage, key: str, info: PixelInfo, index: int
) -> list[tuple[int, int]]:
    """Frame fragments located with ranged reads of item headers, when the
    index did not list them (objects indexed from object storage): the Basic
    Offset Table says where each frame starts.  Raises LookupError when the
    frames cannot be delimited that way (no offset table in a multi-frame)."""
    start = info.value.offset
    if start is None:
        raise LookupError("not located")
    head = storage.read_range(key, start, 8 + 4 * info.number_of_frames)
    tag, table_length = _item_header(head)
    if tag != _ITEM_TAG:
        raise UnsupportedPixelDataError(
            "the encapsulated pixel data does not start with a Basic Offset Table"
        )
    first_item = start + 8 + table_length
    if info.number_of_frames == 1:
        return _scan_items(storage, key, first_item, math.inf)
    if table_length < 4 * info.number_of_frames:
        raise LookupError("frames not delimited without parsing")
    offsets = _basic_offsets(head[8 : 8 + 4 * info.number_of_frames])
    end = first_item + offsets[index + 1] if index + 1 < info.number_of_frames else math.inf
    return _scan_items(storage, key, first_item + offsets[index], end)


def _read_segments(storage: ObjectStorage, key: str, segments: Sequence[tuple[int, int]]) -> bytes:
    if len(segments) == 1:
        return storage.read_range(key, segments[0][0], segments[0][1])
    # Adjacent fragments (the usual layout) in one read, item headers cut out.
    start = segments[0][0]
    end = segments[-1][0] + segments[-1][1]
    if end - start <= sum(length for _, length in segments) + 8 * len(segments) + 1024:
        blob = storage.read_range(key, start, end - start)
        return b"".join(blob[offset - start : offset - start + length] for offset, length in segments)
    return b"".join(storage.read_range(key, offset, length) for offset, length in segments)


def read_frames(storage: ObjectStorage, key: str, info: PixelInfo, numbers: Sequence[int]) -> list[bytes]:
    """The stored bytes of each frame (1-based ``numbers``): native pixels as
    stored, or a frame's compressed fragments joined."""
    info.check_frames(numbers)
    frames: list[bytes] = []
    dataset: Dataset | None = None
    for number in numbers:
        index = number - 1
        try:
            if info.encapsulated:
                frames.append(_read_segments(storage, key, _frame_fragments(storage, key, info, index)))
            else:
                frames.append(_native_frame(storage, key, info, index))
            continue
        except LookupError:
            pass
        if dataset is None:
            dataset = _load_dataset(storage, key)
        frames.append(_frame_from_dataset(dataset, info, index))
    return frames


def _frame_from_dataset(dataset: Dataset, info: PixelInfo, index: int) -> bytes:
    value = dataset[Tag(int(info.pixel_tag, 16))].value
    if info.encapsulated:
        for i, frame in enumerate(generate_frames(value, number_of_frames=info.number_of_frames)):
            if i == index:
                return frame
        raise UnsupportedPixelDataError(f"frame {index + 1} not found in the encapsulated pixel data")
    start_bit, bits = index * info.frame_bits, info.frame_bits
    if start_bit % 8 == 0 and bits % 8 == 0:
        return bytes(value[start_bit // 8 : (start_bit + bits) // 8])
    unpacked = np.unpackbits(np.frombuffer(value, dtype=np.uint8), bitorder="little")
    return bytes(np.packbits(unpacked[start_bit : start_bit + bits], bitorder="little").tobytes())


def read_value(
    storage: ObjectStorage, key: str, path: str, value: StoredValue, transfer_syntax: str
) -> bytes:
    """The bytes of the bulk value at ``path`` (a BulkDataURI path) in Explicit
    VR Little Endian byte order; encapsulated pixel data as its fragments joined."""
    if value.offset is not None and value.length is not None:
        data = storage.read_range(key, value.offset, value.length)
    elif value.fragments is not None or value.offset is not None:
        # Encapsulated: the fragments after the Basic Offset Table, joined.
        items = (
            value.fragments
            if value.fragments is not None
            else _scan_items(storage, key, value.offset or 0, math.inf)
        )
        data = _read_segments(storage, key, items[1:]) if len(items) > 1 else b""
    else:
        data = _value_from_dataset(_load_dataset(storage, key), path)
    word = _WORD_SIZES.get(value.vr)
    if transfer_syntax == ExplicitVRBigEndian and word is not None and value.length is not None:
        data = (
            np.frombuffer(data[: len(data) // word * word], dtype=f">u{word}").astype(f"<u{word}").tobytes()
        )
    return data


def _value_from_dataset(dataset: Dataset, path: str) -> bytes:
    parts = path.split("/")
    node: Dataset = dataset
    for i in range(0, len(parts) - 1, 2):
        node = node[Tag(int(parts[i], 16))].value[int(parts[i + 1])]
    value = node[Tag(int(parts[-1], 16))].value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise LookupError(f"{path} is not a binary value")


def read_palette(storage: ObjectStorage, key: str, palette: Palette) -> tuple[bytes, ...]:
    """The red, green and blue lookup table data (little endian words)."""
    tables: list[bytes] = []
    for data in palette.data:
        if isinstance(data, bytes):
            tables.append(data)
        elif data.offset is not None and data.length is not None:
            tables.append(storage.read_range(key, data.offset, data.length))
        else:
            raise UnsupportedPixelDataError("the palette color lookup tables are not located in the object")
    return tuple(tables)


def apply_palette(info: PixelInfo, array: npt.NDArray[Any], tables: Sequence[bytes]) -> npt.NDArray[Any]:
    """PALETTE COLOR indices to RGB (8 or 16 bits a channel, as the tables say)."""
    if info.palette is None:
        raise UnsupportedPixelDataError("the PALETTE COLOR image has no usable lookup tables")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsStored = info.bits_stored
    for name, descriptor, table in zip(_PALETTE_KEYWORDS, info.palette.descriptors, tables, strict=True):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", list(descriptor))
        setattr(ds, f"{name}PaletteColorLookupTableData", table)
    try:
        rgb: npt.NDArray[Any] = apply_color_lut(array, ds)
    except Exception as exc:
        raise UnsupportedPixelDataError(
            f"the palette cannot be applied: {type(exc).__name__}: {exc}"
        ) from exc
    return rgb


def native_little_endian(info: PixelInfo, data: bytes) -> bytes:
    """A native frame in little endian byte order (frames are served in
    Explicit VR Little Endian)."""
    if info.transfer_syntax != ExplicitVRBigEndian or info.bits_allocated <= 8:
        return data
    word = info.bits_allocated // 8
    return np.frombuffer(data, dtype=f">u{word}").astype(f"<u{word}").tobytes()


# ---------------------------------------------------------------------------
# Decoding


def _frame_dataset(info: PixelInfo, frame: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(info.transfer_syntax)
    ds.Rows = info.rows
    ds.Columns = info.columns
    ds.SamplesPerPixel = info.samples_per_pixel
    ds.BitsAllocated = info.bits_allocated
    ds.BitsStored = info.bits_stored
    ds.HighBit = info.high_bit
    ds.PixelRepresentation = info.pixel_representation
    ds.PhotometricInterpretation = info.photometric
    ds.NumberOfFrames = 1
    if info.samples_per_pixel > 1:
        ds.PlanarConfiguration = info.planar_configuration
    payload = encapsulate([frame]) if info.encapsulated else frame
    setattr(ds, _PIXEL_KEYWORDS[info.pixel_tag], payload)
    return ds


def decode_frame(info: PixelInfo, frame: bytes) -> npt.NDArray[Any]:
    """One frame's pixels: (rows, columns) or (rows, columns, samples), color
    converted to RGB the way pydicom does (YBR of JPEG baseline becomes RGB)."""
    if info.encapsulated and not can_decode(info.transfer_syntax):
        raise UnsupportedPixelDataError(f"no decoder for transfer syntax {info.transfer_syntax}")
    try:
        array: npt.NDArray[Any] = _frame_dataset(info, frame).pixel_array
    except Exception as exc:
        raise UnsupportedPixelDataError(f"the frame cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return array


def decoded_bytes(array: npt.NDArray[Any]) -> bytes:
    """Decoded pixels as native little endian bytes (color by pixel)."""
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


# ---------------------------------------------------------------------------
# Rendering


class ImageFormat(StrEnum):
    JPEG = "image/jpeg"
    PNG = "image/png"


@dataclass(frozen=True, slots=True)
class RenderParams:
    image_format: ImageFormat = ImageFormat.JPEG
    window: Window | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def _voi(values: npt.NDArray[np.float64], window: Window) -> npt.NDArray[np.float64]:
    """VOI LUT function to 0..255 (PS3.3 C.11.2.1.2)."""
    c, w = window.center, window.width
    if window.function is VoiFunction.SIGMOID:
        return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function is VoiFunction.LINEAR_EXACT:
        return np.clip((values - c) / w + 0.5, 0.0, 1.0) * 255.0
    if w <= 1.0:
        return np.where(values > c - 0.5, 255.0, 0.0)
    return np.clip((values - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0) * 255.0


def _grayscale(info: PixelInfo, array: npt.NDArray[Any], window: Window | None) -> npt.NDArray[np.uint8]:
    values = array.astype(np.float64) * info.rescale_slope + info.rescale_intercept
    chosen = window or info.window
    if chosen is None:
        low, high = float(values.min()), float(values.max())
        chosen = Window(center=(low + high) / 2.0 + 0.5, width=max(high - low + 1.0, 1.0))
    out = _voi(values, chosen)
    if info.photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.rint(out).astype(np.uint8)


def _color(info: PixelInfo, array: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if array.dtype == np.uint8:
        return array
    # Palette output is as wide as its tables' entries; samples are BitsStored wide.
    bits = 8 * array.dtype.itemsize if info.photometric == "PALETTE COLOR" else info.bits_stored
    shift = max(bits - 8, 0)
    return (array.astype(np.uint64) >> shift).clip(0, 255).astype(np.uint8)


def _fit(size: tuple[int, int], viewport: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled to fit inside ``viewport``, keeping its aspect ratio."""
    width, height = size
    scale = min(viewport[0] / width, viewport[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_image(info: PixelInfo, array: npt.NDArray[Any], params: RenderParams) -> bytes:
    """A decoded frame (PALETTE COLOR already through :func:`apply_palette`)
    rendered for display: Modality LUT, VOI, MONOCHROME1 inversion
    (grayscale) or 8-bit RGB (color), scaled to the viewport."""
    if info.photometric.startswith("MONOCHROME") and array.ndim == 2:
        image = Image.fromarray(_grayscale(info, array, params.window))
    elif array.ndim == 3 and array.shape[2] == 3:
        image = Image.fromarray(_color(info, array))
    else:
        raise UnsupportedPixelDataError(f"rendering {info.photometric} is not supported")
    if params.viewport is not None:
        target = _fit(image.size, params.viewport)
        if target != image.size:
            image = image.resize(target, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if params.image_format is ImageFormat.PNG:
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=params.quality)
    return out.getvalue()
