"""S3 backend (boto3; AWS S3 or any S3-compatible endpoint such as MinIO).

Write-once is enforced by the server with conditional writes
(``If-None-Match: *`` on PutObject and on CompleteMultipartUpload), so two
writers of one key cannot both succeed and no check-then-put race exists.

Where the sha256 lives
----------------------
Objects up to ``multipart_threshold`` are buffered (at most that many bytes),
so their hash is known before the single PutObject and goes into the object
metadata (``x-amz-meta-sha256``).  Larger objects are streamed as a multipart
upload, and S3 metadata is fixed when the upload is *created* — before the
hash is known.  Rewriting the object afterwards (CopyObject onto itself with
``MetadataDirective=REPLACE``) would copy every byte again, fail above 5 GB
and open a window in which the write-once object is replaced.  A sidecar
object would double the keys to list and delete.  Instead the hash goes into
an object *tag* (``sha256``) right after the upload completes: tags can be
set on an existing object without touching its data, cost one small request,
and HeadObject reports how many an object has (``x-amz-tagging-count``), so
``stat`` makes the extra GetObjectTagging call only for such objects.  If
tagging fails the object is still stored and ``put`` still returns the hash
(the index is the authority); ``stat`` then reports ``sha256=None``.
The credentials therefore need ``s3:PutObjectTagging``/``s3:GetObjectTagging``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pacs_common.storage.base import (
    CHUNK_SIZE,
    HashingReader,
    ObjectArchivedError,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStorage,
    StorageError,
    StoredObject,
    check_size,
    normalise_prefix,
    read_exact,
)
from pacs_common.storage.resilient import GuardedCalls

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024
DEFAULT_PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000  # S3's limit per multipart upload (80 GB at the default part size)
SHA256_FIELD = "sha256"
#: Retrieval speed (and price) of a restore from GLACIER / DEEP_ARCHIVE.
RestoreTier = Literal["Bulk", "Expedited", "Standard"]
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 3,
) -> S3Client:
    """A boto3 S3 client with bounded timeouts and retries.

    A custom endpoint (MinIO, moto, Ceph) gets path-style addressing, since
    bucket-name DNS rarely exists there.  Checksums are sent and validated only
    when an operation requires them: botocore's newer default (CRC on every
    upload) is rejected by several S3-compatible servers, and integrity is
    covered here by the sha256 recorded with each object.
    """
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else {},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A session per client: boto3's default session is not thread-safe.
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


class S3Storage(ObjectStorage):
    """Objects in one bucket, under an optional key prefix."""

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        client: S3Client | None = None,
        storage_class: str | None = None,
        multipart_threshold: int = DEFAULT_PART_SIZE,
        multipart_chunk: int = DEFAULT_PART_SIZE,
    ) -> None:
        # Every part but the last must be >= 5 MiB, and the first part is the
        # threshold-sized buffer, so both limits apply to both values.
        if multipart_threshold < MIN_PART_SIZE or multipart_chunk < MIN_PART_SIZE:
            raise ValueError("multipart threshold and chunk must be at least 5 MiB")
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.client: S3Client = client if client is not None else make_s3_client()
        self.storage_class = storage_class
        self._threshold = multipart_threshold
        self._chunk = multipart_chunk

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _name(self, key: str) -> str:
        if not key:
            raise ValueError("empty object key")
        return self.prefix + key

    # -- writing -----------------------------------------------------------

    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        name = self._name(key)
        reader = HashingReader(stream)
        try:
            head = read_exact(reader, self._threshold)
            peek = reader.read(1) if len(head) == self._threshold else b""
        except (ClientError, BotoCoreError) as exc:  # the source may be another S3 object
            raise _storage_error(exc, key, "read source of") from exc
        if not peek:
            check_size(key, size, reader.size)
            self._put_single(key, name, head, reader.sha256)
        else:
            self._put_multipart(key, name, reader, head, peek, size=size)
        return StoredObject(backend=self.kind, key=key, size=reader.size, sha256=reader.sha256)

    def _put_single(self, key: str, name: str, data: bytes, digest: str) -> None:
        extra: dict[str, Any] = {"StorageClass": self.storage_class} if self.storage_class else {}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=data,
                IfNoneMatch="*",
                Metadata={SHA256_FIELD: digest},
                **extra,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _put_error(exc, key) from exc

    def _put_multipart(
        self, key: str, name: str, reader: HashingReader, head: bytes, peek: bytes, *, size: int | None
    ) -> None:
        # Cheap early refusal so a duplicate does not upload gigabytes first;
        # the conditional complete below is what actually guarantees write-once.
        if self.stat(key) is not None:
            raise ObjectExistsError(f"object {key!r} already exists")
        extra: dict[str, Any] = {"StorageClass": self.storage_class} if self.storage_class else {}
        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=name, **extra)["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise _put_error(exc, key) from exc
        try:
            parts: list[CompletedPartTypeDef] = []
            body, head = head, b""  # drop the extra reference: one part in memory at a time
            while body:
                number = len(parts) + 1
                if number > MAX_PARTS:
                    raise StorageError(
                        f"object {key!r} needs more than {MAX_PARTS} parts; raise the part size"
                    )
                etag = self.client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body
                )["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
                body = peek + read_exact(reader, self._chunk - len(peek))
                peek = b""
            check_size(key, size, reader.size)
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException as exc:
            self._abort(name, upload_id)
            if isinstance(exc, ClientError | BotoCoreError):
                raise _put_error(exc, key) from exc
            raise
        self._tag_sha256(name, reader.sha256)

    def _abort(self, name: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:  # a lifecycle rule reaps it eventually
            log.warning("could not abort multipart upload %s of %s: %s", upload_id, name, exc)

    def _tag_sha256(self, name: str, digest: str) -> None:
        try:
            self.client.put_object_tagging(
                Bucket=self.bucket,
                Key=name,
                Tagging={"TagSet": [{"Key": SHA256_FIELD, "Value": digest}]},
            )
        except (ClientError, BotoCoreError) as exc:
            log.warning("stored %s but could not tag its sha256: %s", name, exc)

    # -- reading -----------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(exc, key, "open") from exc
        return io.BufferedReader(_BodyReader(body, key), buffer_size=CHUNK_SIZE)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        if length == 0:
            return b""
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._name(key), Range=f"bytes={start}-{start + length - 1}"
            )
            return response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange":  # start is past the end
                return b""
            raise _storage_error(exc, key, "read") from exc
        except BotoCoreError as exc:
            raise _storage_error(exc, key, "read") from exc

    def stat(self, key: str) -> ObjectInfo | None:
        name = self._name(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=name)
            digest = head.get("Metadata", {}).get(SHA256_FIELD)
            if digest is None and head.get("TagCount", 0):
                tags = self.client.get_object_tagging(Bucket=self.bucket, Key=name)["TagSet"]
                digest = next((t["Value"] for t in tags if t["Key"] == SHA256_FIELD), None)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise _storage_error(exc, key, "stat") from exc
        except BotoCoreError as exc:
            raise _storage_error(exc, key, "stat") from exc
        return ObjectInfo(key=key, size=head["ContentLength"], sha256=digest)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(exc, key, "delete") from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"s3 listing of {self.bucket}/{self.prefix}{prefix} failed: {exc}") from exc

    # -- archive tiers -----------------------------------------------------

    def restore(self, key: str, days: int = 1, *, tier: RestoreTier = "Standard") -> None:
        """Ask S3 to make an archived (GLACIER/DEEP_ARCHIVE) object readable
        for ``days``; returns at once, the restore completes asynchronously.
        Asking again while a restore is running is not an error."""
        try:
            self.client.restore_object(
                Bucket=self.bucket,
                Key=self._name(key),
                RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": tier}},
            )
        except ClientError as exc:
            if _error_code(exc) == "RestoreAlreadyInProgress":
                return
            raise _storage_error(exc, key, "restore") from exc
        except BotoCoreError as exc:
            raise _storage_error(exc, key, "restore") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (development and tests; in
        production buckets are provisioned with their policies)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise _storage_error(exc, self.bucket, "head bucket") from exc
        except BotoCoreError as exc:
            raise _storage_error(exc, self.bucket, "head bucket") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _storage_error(exc, self.bucket, "create bucket") from exc
        except BotoCoreError as exc:
            raise _storage_error(exc, self.bucket, "create bucket") from exc

    def close(self) -> None:
        self.client.close()


class _BodyReader(io.RawIOBase):
    """A GetObject body as a raw stream whose errors are StorageErrors."""

    def __init__(self, body: StreamingBody, key: str) -> None:
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(exc, self._key, "read") from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _put_error(exc: ClientError | BotoCoreError, key: str) -> StorageError:
    if isinstance(exc, ClientError) and (
        _error_code(exc) == "PreconditionFailed"
        or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    ):
        return ObjectExistsError(f"object {key!r} already exists")
    return _storage_error(exc, key, "put")


def _storage_error(exc: ClientError | BotoCoreError, key: str, action: str) -> StorageError:
    message = f"s3 {action} {key!r} failed: {exc}"
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(message)
        if code == "InvalidObjectState":
            return ObjectArchivedError(f"object {key!r} is archived; restore it first ({exc})")
    return StorageError(message)


class GuardedS3Storage(GuardedCalls, S3Storage):
    """An :class:`S3Storage` whose object calls go through ``guard`` (retries, breaker)."""
