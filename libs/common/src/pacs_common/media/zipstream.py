"""A directory (an exported File-set) as a zip, produced in chunks.

:class:`zipfile.ZipFile` writes to a sink that cannot seek (sizes and CRCs
go into data descriptors), and the sink is drained after every chunk, so
neither a file nor the archive is ever held in memory whole.  Entries are
stored, not deflated: most image data is compressed already, and stored
entries are what every reader of DICOM media understands.  The DICOMDIR
comes first, then the files in name order.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = ["CHUNK_SIZE", "iter_zip", "write_zip"]

CHUNK_SIZE: Final = 1024 * 1024
_DICOMDIR: Final = "DICOMDIR"


class _Sink:
    """Collects what ZipFile writes until the generator hands it out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _members(directory: Path) -> list[tuple[Path, str]]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    names = [(p, p.relative_to(directory).as_posix()) for p in files]
    return sorted(names, key=lambda item: (item[1] != _DICOMDIR, item[1]))


def iter_zip(directory: Path, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The files under ``directory`` as one zip archive, in chunks of about
    ``chunk_size`` bytes (blocking file reads: iterate it in a thread)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for path, name in _members(directory):
            info = zipfile.ZipInfo.from_file(path, name)
            info.compress_type = zipfile.ZIP_STORED
            with path.open("rb") as source, archive.open(info, "w") as entry:
                while chunk := source.read(chunk_size):
                    entry.write(chunk)
                    if data := sink.drain():
                        yield data
            if data := sink.drain():
                yield data
    if data := sink.drain():
        yield data


def write_zip(directory: Path, target: Path) -> int:
    """The zip of ``directory`` written to ``target``; its size in bytes."""
    size = 0
    with target.open("wb") as out:
        for chunk in iter_zip(directory):
            out.write(chunk)
            size += len(chunk)
    return size
