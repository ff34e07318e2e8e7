"""C-FIND SCP for the Patient Root and Study Root Q/R information models.

A thin adapter: the identifier becomes a :class:`QueryRequest` (level from
QueryRetrieveLevel, keys as DICOM JSON), the query-service does the matching
and streams matches, and each match goes out as a pending response (0xFF00)
as soon as it arrives, carrying QueryRetrieveLevel, RetrieveAETitle (ours)
and a Specific Character Set the SCU can read (see
:mod:`dimse_gateway.identifiers`).

* C-CANCEL: pynetdicom answers 0xFE00 when the handler yields it; leaving
  the ``with`` block closes the stream, which cancels the query on the
  query-service.
* Truncation: when more entities matched than the query-service's
  ``max_matches``, the pending responses sent are followed by a final
  **0xA700 (Refused: Out of resources)** with the Error Comment
  "match limit N reached, narrow the query" — PS3.4 C.4.1.1.4 has no
  "partial result" status, and answering Success would let the SCU believe
  it saw everything.
* Bad identifiers (no or unknown level, a level outside the model, values
  the query-service refuses) → 0xA900 with the reason; an identifier that
  cannot be decoded → 0xC000; the query-service unreachable → 0xA700.  The
  association stays open in every case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Final, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.events import Event

from dimse_gateway.audit import DimseAudit
from dimse_gateway.identifiers import (
    FIND_MODELS,
    IdentifierError,
    find_response,
    query_level,
    requested_character_set,
    to_json,
)
from dimse_gateway.metrics import GatewayMetrics
from pacs_common.query import (
    InvalidQueryError,
    QueryClient,
    QueryRequest,
    QueryUnavailableError,
)

logger = logging.getLogger(__name__)

SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00
CANCELLED: Final = 0xFE00
OUT_OF_RESOURCES: Final = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
UNABLE_TO_PROCESS: Final = 0xC000
_ERROR_COMMENT_MAX = 64

FindResponse = tuple[int | Dataset, Dataset | None]


def _failure(code: int, comment: str) -> FindResponse:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return status, None


class FindHandler:
    """Handles EVT_C_FIND for the Q/R Find SOP classes (:attr:`sop_classes`)."""

    sop_classes: tuple[str, ...] = tuple(FIND_MODELS)

    def __init__(
        self, query: QueryClient, ae_title: str, metrics: GatewayMetrics, audit: DimseAudit | None = None
    ) -> None:
        self._query = query
        self._ae_title = ae_title
        self._metrics = metrics
        self._audit = audit

    def __call__(self, event: Event) -> Iterator[FindResponse]:
        started = time.perf_counter()
        final = SUCCESS
        try:
            for status, identifier in self._find(event):
                code = int(status.Status) if isinstance(status, Dataset) else status
                if code != PENDING:
                    final = code
                yield status, identifier
        finally:
            self._metrics.operations.labels("C-FIND", f"0x{final:04X}").inc()
            self._metrics.retrieve_seconds.labels("C-FIND").observe(time.perf_counter() - started)
            if self._audit is not None:
                sop_class = str(cast(C_FIND, event.request).AffectedSOPClassUID)
                self._audit.query(event, sop_class, final)

    def _find(self, event: Event) -> Iterator[FindResponse]:
        request = cast(C_FIND, event.request)
        model = FIND_MODELS.get(str(request.AffectedSOPClassUID))
        if model is None:
            yield _failure(UNABLE_TO_PROCESS, "not a Q/R Find SOP class")
            return
        try:
            identifier = event.identifier
        except Exception as exc:
            logger.warning("C-FIND identifier not decodable: %s", exc)
            yield _failure(UNABLE_TO_PROCESS, f"identifier not decodable: {exc}")
            return
        try:
            level = query_level(identifier, model)
            keys = to_json(identifier)
        except IdentifierError as exc:
            yield _failure(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
            return
        charset = requested_character_set(identifier)
        query = QueryRequest(level=level, information_model=model, identifier=keys)
        try:
            stream = self._query.find(query)
        except InvalidQueryError as exc:
            yield _failure(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, exc.reason)
            return
        except QueryUnavailableError as exc:
            logger.error("C-FIND: query-service unavailable: %s", exc.reason)
            yield _failure(OUT_OF_RESOURCES, "query service unavailable")
            return
        matches = self._metrics.find_matches.labels(level.value)
        with stream:
            try:
                for match in stream:
                    if event.is_cancelled:
                        yield CANCELLED, None
                        return
                    yield PENDING, find_response(match, level, self._ae_title, charset)
                    matches.inc()
            except QueryUnavailableError as exc:
                logger.error("C-FIND: query failed while streaming: %s", exc.reason)
                yield _failure(OUT_OF_RESOURCES, f"query failed: {exc.reason}")
                return
            completion = stream.completion
        if completion is not None and completion.truncated:
            limit = completion.max_matches or completion.count
            yield _failure(OUT_OF_RESOURCES, f"match limit {limit} reached, narrow the query")
            return
        yield SUCCESS, None
