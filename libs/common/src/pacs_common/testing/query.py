"""A query-service client whose matches arrive slowly, for C-CANCEL tests:
the cancel then provably arrives while matches are still streaming,
however fast the machine is."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pacs_common.query import QueryClient, QueryRequest, QueryStream, WorklistQueryRequest


class PacedStream(QueryStream):
    """A query-service stream handing out one match per ``PACE`` seconds."""

    PACE = 0.01

    def __init__(self, inner: QueryStream) -> None:
        self._inner = inner
        self.completion = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for match in self._inner:
            time.sleep(self.PACE)
            yield match
        self.completion = self._inner.completion

    def close(self) -> None:
        self._inner.close()


class PacedQueryClient(QueryClient):
    """The real client, its C-FIND and worklist matches paced."""

    def find(self, request: QueryRequest) -> QueryStream:
        return PacedStream(super().find(request))

    def worklist(self, request: WorklistQueryRequest) -> QueryStream:
        return PacedStream(super().worklist(request))
