"""One call to an inference endpoint, and what its answer means.

* ``200`` with ``multipart/related`` DICOM parts: the results (synchronous);
* ``204``: done, nothing to store;
* ``202``: accepted; the results will come to the callback URL;
* ``408``, ``429``, ``5xx``, a timeout or no connection: try again later;
* any other status: a permanent failure (the request itself is refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import httpx
from opentelemetry import propagate

from ai_connector.contract import InferenceRequest
from ai_connector.results import InvalidResultError, parse_results

__all__ = ["Outcome", "OutcomeKind", "call_endpoint"]

_RETRYABLE_STATUSES: Final = frozenset({408, 425, 429})
_DETAIL_LENGTH: Final = 300


class OutcomeKind(StrEnum):
    RESULTS = "results"
    ACCEPTED = "accepted"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    reason: str = ""
    contents: list[bytes] = field(default_factory=list)


def _detail(response: httpx.Response, body: bytes) -> str:
    text = body[:_DETAIL_LENGTH].decode("utf-8", errors="replace").strip()
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


async def call_endpoint(
    client: httpx.AsyncClient,
    url: str,
    request: InferenceRequest,
    *,
    headers: dict[str, str],
    timeout_seconds: float,
    max_bytes: int,
) -> Outcome:
    body = request.model_dump_json(by_alias=True).encode()
    sent = {
        **headers,
        "Content-Type": "application/json",
        "Accept": 'multipart/related; type="application/dicom"',
    }
    propagate.inject(sent)  # W3C traceparent: the service's spans join the connector's trace
    try:
        async with client.stream(
            "POST",
            url,
            content=body,
            headers=sent,
            timeout=httpx.Timeout(timeout_seconds),
        ) as response:
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > max_bytes:
                    return Outcome(OutcomeKind.FAIL, f"answer larger than {max_bytes} bytes")
    except httpx.TimeoutException:
        return Outcome(OutcomeKind.RETRY, f"no answer within the timeout of {timeout_seconds:g}s")
    except httpx.HTTPError as exc:
        return Outcome(OutcomeKind.RETRY, f"endpoint unreachable: {exc!r}")
    content = bytes(received)
    status = response.status_code
    if status == 200:
        try:
            parts = parse_results(response.headers.get("content-type", ""), content)
        except InvalidResultError as exc:
            return Outcome(OutcomeKind.FAIL, str(exc))
        return Outcome(OutcomeKind.RESULTS, contents=[part.content for part in parts])
    if status == 204:
        return Outcome(OutcomeKind.RESULTS)
    if status == 202:
        return Outcome(OutcomeKind.ACCEPTED)
    if status >= 500 or status in _RETRYABLE_STATUSES:
        return Outcome(OutcomeKind.RETRY, _detail(response, content))
    return Outcome(OutcomeKind.FAIL, _detail(response, content))
