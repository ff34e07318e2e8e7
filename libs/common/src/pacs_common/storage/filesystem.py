"""Local filesystem backend: one file per object under a root directory.

Durability and write-once come from the POSIX primitives rather than from
locks: an object is written to a temporary file under ``root/.tmp``, flushed
and fsynced, then published with ``os.link``, which fails atomically when the
final name exists.  A reader therefore never sees a half-written object, two
writers of the same key cannot both win, and a crash leaves at worst a stale
temporary file (``root/.tmp`` holds nothing else, so it is safe to sweep).

The sha256 is kept in the ``user.sha256`` extended attribute so ``stat`` does
not have to re-read the object; filesystems without user xattrs simply report
``sha256=None`` (the index holds the authoritative value anyway).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat as stat_module
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pacs_common.storage.base import (
    CHUNK_SIZE,
    HashingReader,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StoredObject,
    check_size,
)

log = logging.getLogger(__name__)

#: Directory under the root holding in-flight writes; never a key component.
TMP_DIR_NAME = ".tmp"
#: Extended attribute recording the object's sha256 (hex).
SHA256_XATTR = "user.sha256"
# errnos of os.link meaning "a hard link is not possible here", not "broken".
_NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP})
_SHA256_HEX_LENGTH = 64


def split_key(key: str) -> list[str]:
    """The path components of ``key``; ValueError for keys that could escape
    the root or alias another key ('..', '.', absolute, empty components)."""
    if not key or key.startswith("/") or "\x00" in key:
        raise ValueError(f"invalid object key {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid object key {key!r}")
    if parts[0] == TMP_DIR_NAME:
        raise ValueError(f"object key {key!r} uses the reserved directory {TMP_DIR_NAME!r}")
    return parts


class FilesystemStorage(ObjectStorage):
    """Objects as files under ``root`` (created on first write)."""

    kind = "filesystem"

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        # No I/O here: constructing a storage must not fail or block; a broken
        # root surfaces as StorageError on first use.
        self.root = Path(root)
        self._fsync = fsync

    def __repr__(self) -> str:
        return f"FilesystemStorage({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """Where ``key`` lives on disk (for zero-copy readers such as sendfile)."""
        return self.root.joinpath(*split_key(key))

    # -- writing -----------------------------------------------------------

    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        final = self.path_for(key)
        try:
            tmp_dir = self.root / TMP_DIR_NAME
            self._ensure_dir(tmp_dir)
            tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                reader = HashingReader(stream)
                with os.fdopen(fd, "wb") as out:
                    while chunk := reader.read(CHUNK_SIZE):
                        out.write(chunk)
                    out.flush()
                    if self._fsync:
                        os.fsync(out.fileno())
                check_size(key, size, reader.size)
                _set_sha256(tmp, reader.sha256)
                self._publish(tmp, final, key)
            finally:
                tmp.unlink(missing_ok=True)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"filesystem put of {key!r} under {self.root} failed: {exc}") from exc
        return StoredObject(backend=self.kind, key=key, size=reader.size, sha256=reader.sha256)

    def put_file(self, key: str, path: Path) -> StoredObject:
        """Hard-link ``path`` into place when it is on the root's filesystem.

        Zero copy: the file is read once (to hash it) and fsynced, then linked.
        The caller keeps ``path`` and may unlink or rename it afterwards, but
        must not modify it in place: the object *is* that inode.  On another
        filesystem (or where links are refused) the file is streamed instead.
        """
        final = self.path_for(key)
        try:
            source = os.stat(path)
            self._ensure_dir(self.root)
            same_device = os.stat(self.root).st_dev == source.st_dev
        except OSError as exc:
            raise StorageError(f"filesystem put of {key!r} from {path} failed: {exc}") from exc
        if not (same_device and stat_module.S_ISREG(source.st_mode)):
            return super().put_file(key, path)
        try:
            size, digest = self._hash_and_sync(path)
            _set_sha256(path, digest)
            self._publish(path, final, key)
        except OSError as exc:
            if exc.errno in _NO_LINK_ERRNOS:
                log.debug("hard link of %s refused (%s); streaming instead", path, exc)
                return super().put_file(key, path)
            raise StorageError(f"filesystem put of {key!r} from {path} failed: {exc}") from exc
        return StoredObject(backend=self.kind, key=key, size=size, sha256=digest)

    def _hash_and_sync(self, path: Path) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
            if self._fsync:
                os.fsync(f.fileno())
        return size, digest.hexdigest()

    def _publish(self, source: Path, final: Path, key: str) -> None:
        """Link ``source`` to ``final``; the link is the atomic write-once step."""
        self._ensure_dir(final.parent)
        try:
            os.link(source, final)
        except FileExistsError as exc:
            raise ObjectExistsError(f"object {key!r} already exists") from exc
        if self._fsync:
            _fsync_dir(final.parent)

    def _ensure_dir(self, directory: Path) -> None:
        """mkdir -p, fsyncing the parent of each directory it creates so a
        published object's path survives a crash, not only its data."""
        missing: list[Path] = []
        current = directory
        while not current.is_dir() and current != current.parent:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue  # a concurrent writer made it (or it is a file: the next step fails)
            if self._fsync:
                _fsync_dir(path.parent)

    # -- reading -----------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        path = self.path_for(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFoundError(f"object {key!r} not found") from exc
        except OSError as exc:
            raise StorageError(f"filesystem open of {key!r} failed: {exc}") from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        with self.open(key) as f:
            try:
                f.seek(start)
                parts: list[bytes] = []
                remaining = length
                while remaining > 0 and (chunk := f.read(remaining)):
                    parts.append(chunk)
                    remaining -= len(chunk)
            except OSError as exc:
                raise StorageError(f"filesystem read of {key!r} failed: {exc}") from exc
        return b"".join(parts)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"filesystem stat of {key!r} failed: {exc}") from exc
        if not stat_module.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key=key, size=st.st_size, sha256=_get_sha256(path))

    def delete(self, key: str) -> None:
        # Empty directories are left in place: removing them would race with a
        # concurrent put that has just created them.
        try:
            self.path_for(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"filesystem delete of {key!r} failed: {exc}") from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        # Walk only the deepest directory the prefix names, then filter by the
        # full (string) prefix, which may end mid-component.
        directory = prefix.rpartition("/")[0]
        start = self.root.joinpath(*split_key(directory)) if directory else self.root

        def fail(exc: OSError) -> None:
            if isinstance(exc, FileNotFoundError | NotADirectoryError):
                return
            raise StorageError(f"filesystem listing under {start} failed: {exc}") from exc

        for dirpath, dirnames, filenames in os.walk(start, onerror=fail):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            if rel == ".":
                rel = ""
                dirnames[:] = [d for d in dirnames if d != TMP_DIR_NAME]
            dirnames.sort()
            for name in sorted(filenames):
                key = f"{rel}/{name}" if rel else name
                if key.startswith(prefix):
                    yield key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_sha256(path: Path, digest: str) -> None:
    try:
        os.setxattr(path, SHA256_XATTR, digest.encode("ascii"))
    except OSError as exc:  # no user xattrs on this filesystem: stat reports None
        log.debug("cannot record sha256 xattr on %s: %s", path, exc)


def _get_sha256(path: Path) -> str | None:
    try:
        value = os.getxattr(path, SHA256_XATTR).decode("ascii", errors="replace")
    except OSError:
        return None
    return value if len(value) == _SHA256_HEX_LENGTH else None
