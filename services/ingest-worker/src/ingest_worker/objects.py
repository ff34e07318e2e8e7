"""Reading stored objects for parsing: the head first, the rest on demand.

Parsing is CPU work under the GIL, so a batch is parsed on one thread (many
threads parsing at once cost twice the CPU in lock hand-offs); reading is
I/O, so the first bytes of every object of the batch are fetched
concurrently beforehand.  Almost every header fits in that head; a larger
one continues with ranged reads of the same object, and values the parser
skips (Pixel Data) are never fetched.
"""

from __future__ import annotations

import io
from typing import Any, Final

from pacs_common.storage.base import ObjectStorage

#: Bytes fetched up front: more than nearly every DICOM header.
HEAD_BYTES: Final = 64 * 1024
#: Ranged reads beyond the head fetch at least this much.
BLOCK_BYTES: Final = 256 * 1024


def read_head(storage: ObjectStorage, key: str, size: int) -> bytes:
    """The first bytes of an object (all of it when small)."""
    return storage.read_range(key, 0, min(size, HEAD_BYTES) if size > 0 else HEAD_BYTES)


class ObjectReader(io.RawIOBase):
    """A stored object as a seekable binary stream: ``head`` (its first
    bytes) from memory, the rest through ``read_range`` in blocks."""

    def __init__(self, storage: ObjectStorage, key: str, size: int, head: bytes) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._head = head
        asked = min(size, HEAD_BYTES) if size > 0 else HEAD_BYTES
        # A head shorter than asked for means the object ends there.
        self._size = len(head) if len(head) < asked else max(size, len(head))
        self._block_start = 0
        self._block = b""
        self._pos = 0
        self.range_reads = 0
        # A read that failed, even if the parser caught it and went on: the
        # result of that parse cannot be trusted.
        self.failure: BaseException | None = None

    @property
    def name(self) -> str:
        """The object's key (``io.BufferedReader.name`` asks for one)."""
        return self._key

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._size
        if offset < 0:
            raise ValueError("negative seek position")
        self._pos = offset
        return offset

    def _chunk(self, want: int) -> bytes:
        """Bytes at the position, from the head or a block (fetching one)."""
        pos = self._pos
        if pos < len(self._head):
            return self._head[pos : pos + want]
        start = pos - self._block_start
        if not 0 <= start < len(self._block):
            length = min(max(want, BLOCK_BYTES), self._size - pos)
            try:
                self._block = self._storage.read_range(self._key, pos, length)
            except BaseException as exc:
                self.failure = exc
                raise
            self._block_start = pos
            self.range_reads += 1
            start = 0
        return self._block[start : start + want]

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._size - self._pos if size is None or size < 0 else size
        parts: list[bytes] = []
        while remaining > 0 and self._pos < self._size:
            chunk = self._chunk(remaining)
            if not chunk:
                break
            parts.append(chunk)
            self._pos += len(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
