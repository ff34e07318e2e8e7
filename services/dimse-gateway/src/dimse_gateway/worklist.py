"""Modality Worklist C-FIND SCP (PS3.4 K): a thin adapter to the query-service.

The identifier is decoded (pydicom decodes whatever Specific Character Set
the modality used) and sent as DICOM JSON to ``POST /v1/worklist/query``;
each match streams back as a pending response as soon as it arrives.  A
C-CANCEL closes the stream, which ends the query in the service.

Responses are encoded in the modality's own Specific Character Set when
every value fits in it, else in ISO_IR 192 (UTF-8), which it may or may not
display but which loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt
from pynetdicom.events import Event, EventHandlerType

from dimse_gateway import workflow_contexts as wf
from dimse_gateway.metrics import GatewayMetrics
from pacs_common.query.client import InvalidQueryError, QueryServiceError, QueryStream
from pacs_common.query.models import WorklistQueryRequest
from pacs_common.workflow.dicom_json import SPECIFIC_CHARACTER_SET, to_dataset, to_json

logger = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})

FindResult = tuple[Any, Dataset | None]


class WorklistQueries(Protocol):
    """What the handler needs of :class:`pacs_common.query.QueryClient`."""

    def worklist(self, request: WorklistQueryRequest) -> QueryStream: ...


class WorklistHandler:
    """Handles EVT_C_FIND of the Modality Worklist Information Model.

    pynetdicom binds one EVT_C_FIND handler per AE: with Q/R C-FIND in the
    same gateway, register it in :class:`dimse_gateway.server.FindRouter`
    under ``MODALITY_WORKLIST_FIND`` instead of binding :meth:`handlers`.
    """

    def __init__(
        self, queries: WorklistQueries, metrics: GatewayMetrics, *, case_insensitive_pn: bool | None = None
    ) -> None:
        self._queries = queries
        self._metrics = metrics
        self._case_insensitive_pn = case_insensitive_pn

    def handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_C_FIND, self)]

    def __call__(self, event: Event) -> Iterator[FindResult]:
        final: Any = wf.SUCCESS
        matches = 0
        try:
            for result in self._find(event):
                final = result[0]
                if result[1] is not None:
                    matches += 1
                yield result
        finally:
            code = int(final.Status) if isinstance(final, Dataset) else int(final)
            code = wf.SUCCESS if code == wf.PENDING else code
            self._metrics.operations.labels("C-FIND-MWL", f"0x{code:04X}").inc()
            logger.info("worklist C-FIND answered", extra={"matches": matches, "status": f"0x{code:04X}"})

    def _find(self, event: Event) -> Iterator[FindResult]:
        if str(getattr(event.request, "AffectedSOPClassUID", "")) != wf.MODALITY_WORKLIST_FIND:
            yield wf.status(wf.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "not a worklist query"), None
            return
        try:
            identifier = event.identifier
            charsets = _charsets(identifier)
            query = to_json(identifier)
        except Exception as exc:
            logger.warning("worklist C-FIND identifier unreadable: %r", exc)
            yield wf.status(wf.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "cannot decode the identifier"), None
            return
        query.pop(SPECIFIC_CHARACTER_SET, None)
        request = WorklistQueryRequest(identifier=query, case_insensitive_pn=self._case_insensitive_pn)
        try:
            stream = self._queries.worklist(request)
        except InvalidQueryError as exc:
            yield wf.status(wf.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, exc.reason), None
            return
        except QueryServiceError as exc:
            logger.error("worklist query failed: %s", exc.reason)
            yield wf.status(wf.UNABLE_TO_PROCESS, "worklist unavailable"), None
            return
        with stream:
            try:
                for match in stream:
                    if event.is_cancelled:
                        yield wf.CANCEL, None
                        return
                    yield wf.PENDING, _response(match, charsets)
            except QueryServiceError as exc:
                logger.error("worklist query failed while streaming: %s", exc.reason)
                yield wf.status(wf.UNABLE_TO_PROCESS, "worklist query failed"), None
                return
            if event.is_cancelled:
                yield wf.CANCEL, None
                return
            completion = stream.completion
        if completion is not None and completion.truncated:
            yield wf.status(wf.OUT_OF_RESOURCES, f"more than {completion.max_matches} matches"), None


def _charsets(identifier: Dataset) -> list[str]:
    """The Specific Character Set terms the modality used (empty: the default repertoire)."""
    value = identifier.get("SpecificCharacterSet")
    if value is None:
        return []
    terms = list(value) if isinstance(value, MultiValue | list) else [value]
    return [str(t).strip() for t in terms if str(t).strip() or len(terms) > 1]


def _response(match: dict[str, Any], charsets: list[str]) -> Dataset:
    dataset = to_dataset(match)
    if "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet
    chosen = charsets if _fits(dataset, charsets) else [UTF8]
    if chosen and chosen != [""]:
        dataset.SpecificCharacterSet = chosen if len(chosen) > 1 else chosen[0]
    return dataset


def _fits(dataset: Dataset, charsets: list[str]) -> bool:
    """Whether every text value can be written in ``charsets`` (each
    character in one of them: ISO 2022 switches between them)."""
    if not charsets or charsets == [""]:
        encodings = ["ascii"]
    else:
        try:
            encodings = convert_encodings(charsets)
        except Exception:
            return False
    return all(_encodable(text, encodings) for text in _texts(dataset))


def _texts(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _texts(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
            for value in values:
                yield str(value)


def _encodable(text: str, encodings: list[str]) -> bool:
    if text.isascii():
        return True
    for encoding in encodings:
        try:
            text.encode(encoding)
            return True
        except (UnicodeError, LookupError):
            continue
    return all(_char_encodable(c, encodings) for c in text)


def _char_encodable(char: str, encodings: list[str]) -> bool:
    for encoding in encodings:
        try:
            char.encode(encoding)
            return True
        except (UnicodeError, LookupError):
            continue
    return False
