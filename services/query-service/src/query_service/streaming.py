"""Match streams as NDJSON responses (the contract of ``pacs_common.query``).

Each match is written as soon as the database hands it over, so the
gateway can send C-FIND pending responses while the query still runs; a
client that disconnects (C-CANCEL) stops the generator, which ends the
query and gives its connection back to the pool.

Starlette notices a disconnect only when a write fails (ASGI 2.4 servers)
and leaves the body iterator to the garbage collector; the response here
always watches for ``http.disconnect`` while streaming and closes the
iterator itself, so a query that is still searching stops at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pacs_common.query.models import NDJSON, QueryCompletion, QueryFailure, QueryLine

log = logging.getLogger(__name__)


def _line(line: QueryLine) -> bytes:
    return line.model_dump_json(exclude_none=True).encode() + b"\n"


class _CancellableStreamingResponse(StreamingResponse):
    """Streams until done or until the client goes away, then closes the body iterator."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body_iterator
        try:
            async with anyio.create_task_group() as task_group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    task_group.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    task_group.cancel_scope.cancel()

                task_group.start_soon(stream)
                task_group.start_soon(watch)
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def ndjson_stream(
    matches: AsyncIterator[dict[str, Any]],
    completion: Callable[[], QueryCompletion],
    on_close: Callable[[bool], None] | None = None,
) -> StreamingResponse:
    """Stream ``matches`` as ``match`` lines, then the ``done`` line that
    ``completion()`` gives once ``matches`` is exhausted.  A failure after
    the first byte becomes an ``error`` line (the status is already 200).
    ``on_close(completed)`` is called once the stream ends, however it ends."""

    async def body() -> AsyncIterator[bytes]:
        completed = False
        try:
            async for match in matches:
                yield _line(QueryLine(match=match))
            completed = True
        except Exception as exc:
            log.exception("query failed while streaming")
            yield _line(QueryLine(error=QueryFailure(code="internal", reason=f"query failed: {exc}")))
            return
        finally:
            aclose = getattr(matches, "aclose", None)
            if aclose is not None:
                await aclose()
            if on_close is not None:
                on_close(completed)
        yield _line(QueryLine(done=completion()))

    return _CancellableStreamingResponse(body(), media_type=NDJSON)
