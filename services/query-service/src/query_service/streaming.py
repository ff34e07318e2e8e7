"""Match streams as NDJSON responses (the contract of ``pacs_common.query``).

Each match is written as soon as the database hands it over, so the
gateway can send C-FIND pending responses while the query still runs; a
client that disconnects (C-CANCEL) stops the generator, which ends the
query and gives its connection back to the pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from pacs_common.query.models import NDJSON, QueryCompletion, QueryFailure, QueryLine

log = logging.getLogger(__name__)


def _line(line: QueryLine) -> bytes:
    return line.model_dump_json(exclude_none=True).encode() + b"\n"


def ndjson_stream(
    matches: AsyncIterator[dict[str, Any]], completion: Callable[[], QueryCompletion]
) -> StreamingResponse:
    """Stream ``matches`` as ``match`` lines, then the ``done`` line that
    ``completion()`` gives once ``matches`` is exhausted.  A failure after
    the first byte becomes an ``error`` line (the status is already 200)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for match in matches:
                yield _line(QueryLine(match=match))
        except Exception as exc:
            log.exception("query failed while streaming")
            yield _line(QueryLine(error=QueryFailure(code="internal", reason=f"query failed: {exc}")))
            return
        yield _line(QueryLine(done=completion()))

    return StreamingResponse(body(), media_type=NDJSON)
