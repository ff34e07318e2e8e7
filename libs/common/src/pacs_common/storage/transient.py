"""Which storage failures are transient (worth a retry, and counted by the
circuit breaker) and which are answers (not found, exists, archived, refused)."""

from __future__ import annotations

import sys

from pacs_common.storage.base import (
    ObjectArchivedError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)

__all__ = ["is_transient_storage_error"]

_ANSWERS = (ObjectNotFoundError, ObjectExistsError, ObjectArchivedError)
_S3_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "RequestTimeout",
        "RequestTimeTooSkewed",
    }
)
_TRANSIENT_HTTP = frozenset({408, 429})


def is_transient_storage_error(error: BaseException) -> bool:
    """A backend error caused by the network or an overloaded/failing server."""
    if not isinstance(error, StorageError) or isinstance(error, _ANSWERS):
        return False
    cause = error.__cause__
    if cause is None:
        return False
    return _is_transient_s3(cause) or _is_transient_azure(cause) or isinstance(cause, OSError)


def _is_transient_s3(cause: BaseException) -> bool:
    if "botocore" not in sys.modules:  # no S3 backend in this process
        return False
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(cause, BotoConnectionError | HTTPClientError):
        return True  # connect / read timeouts, refused, reset, closed
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", ""))
        status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _S3_TRANSIENT_CODES or status >= 500 or status in _TRANSIENT_HTTP
    return False


def _is_transient_azure(cause: BaseException) -> bool:
    if "azure.core" not in sys.modules:  # no Azure backend in this process
        return False
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(cause, ServiceRequestError | ServiceResponseError):
        return True  # no connection, or the response never came
    if isinstance(cause, HttpResponseError):
        status = cause.status_code or 0
        return status >= 500 or status in _TRANSIENT_HTTP
    return False
