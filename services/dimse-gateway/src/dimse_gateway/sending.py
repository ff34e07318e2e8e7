"""C-STORE sub-operations of C-MOVE and C-GET, and their responses.

Why the gateway runs sub-operations itself instead of through pynetdicom's
``EVT_C_MOVE`` / ``EVT_C_GET`` generator protocol: that protocol sends only
in-memory pydicom Datasets (every instance decoded and re-encoded, so neither
byte-identical nor streaming), opens the C-MOVE sub-association itself (so a
handler cannot see which transfer syntaxes the destination accepted, and
cannot transcode for it), and counts a sub-operation that never started (an
instance offline or missing from storage) without its SOP Instance UID.  So
:mod:`dimse_gateway.server` routes C-MOVE and C-GET requests to
:mod:`dimse_gateway.move` / :mod:`dimse_gateway.get`, which use this module:

* :class:`InstanceFiles` gives each instance as a local Part 10 file: the
  object itself on a filesystem tier, else streamed to a spool file (one
  instance at a time on disk, never a whole instance or study in memory);
* :class:`SubOperationSender` decides per instance: not ONLINE → failed
  (NEARLINE / OFFLINE, or an object the storage reports archived: its
  restore is requested, see :mod:`pacs_common.archive.requests`, once for
  the whole request and before the final response);
  stored transfer syntax accepted by the peer → sent unchanged (chunked from
  the file, byte-identical); else converted with
  :mod:`pacs_common.dicom.transcode` (decompressed, or losslessly compressed
  when only a compressed syntax was accepted) → sent; the peer's C-STORE
  status → completed / warning / failed; C-CANCEL is checked between
  sub-operations;
* :class:`RetrieveResponder` sends the pending and final C-MOVE / C-GET
  responses: counts, final status 0x0000 / 0xB000 (some failed or warned) /
  0xA702 (all failed) / 0xFE00 (cancelled), and the Failed SOP Instance UID
  List (0008,0058) in the final identifier.

What was sent is recorded as accessed (``last_accessed_at``, through an
in-memory recorder written in the background: no database round-trip per
sub-operation).

Chunked sending (``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``) is set
process-wide by ``main``; without it pynetdicom reads each file whole first.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Final, Protocol

from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext, build_context

from dimse_gateway.identifiers import IdentifierError, query_level, to_json
from dimse_gateway.metrics import GatewayMetrics
from pacs_common.archive.requests import RESTORABLE
from pacs_common.dicom.transcode import TranscodeError, choose_transfer_syntax, transcode_file
from pacs_common.query import (
    InformationModel,
    InvalidQueryError,
    QueryClient,
    QueryUnavailableError,
    RetrievableInstance,
    RetrieveRequest,
)
from pacs_common.storage import StorageRegistry
from pacs_common.storage.local_files import StoredFiles, UnreadableObjectError

logger = logging.getLogger(__name__)

# Retrieve statuses (PS3.4 C.4.2.1.5, C.4.3.1.4).
SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00
CANCELLED: Final = 0xFE00
# Warning: Sub-operations Complete – One or more Failures or Warnings.
SOME_SUBOPERATIONS_FAILED: Final = 0xB000
# Refused: Out of Resources – Unable to calculate number of matches.
UNABLE_TO_CALCULATE_MATCHES: Final = 0xA701
# Refused: Out of Resources – Unable to perform sub-operations.
UNABLE_TO_PERFORM_SUBOPERATIONS: Final = 0xA702
# Refused: Move Destination unknown.
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
# Error: Identifier does not match SOP Class.
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
# Failed: Unable to process.
UNABLE_TO_PROCESS: Final = 0xC000

#: Number of ... Sub-operations are US: a retrieve answers for at most this many.
MAX_SUBOPERATIONS: Final = 65535
#: Presentation contexts one association may propose (PS3.8: IDs 1..255, odd).
MAX_CONTEXTS: Final = 128
_ERROR_COMMENT_MAX = 64
# (0008,0058) is UI: a value of at most 64 KiB in explicit VR.
_FAILED_LIST_MAX_BYTES = 65534
ONLINE = "ONLINE"


class RetrieveSettings(BaseSettings):
    """What C-MOVE / C-GET need beyond ``GatewaySettings`` (``PACS_GATEWAY_RETRIEVE_*``)."""

    model_config = SettingsConfigDict(env_prefix="PACS_GATEWAY_RETRIEVE_", extra="ignore")

    # (The storage tiers instances are read from are every tier of
    # pacs_common.settings.StorageTiersSettings, PACS_STORAGE_TIERS.)
    # TLS towards nodes marked `tls` (minimal for now: DICOM TLS proper is a later issue).
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


class Outcome(StrEnum):
    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"


def classify_store_status(status: int | None) -> Outcome:
    """A C-STORE response status as a sub-operation outcome (None: no response)."""
    if status == SUCCESS:
        return Outcome.COMPLETED
    if status is not None and (status == 0x0001 or 0xB000 <= status <= 0xBFFF):
        return Outcome.WARNING
    return Outcome.FAILED


@dataclass
class SubOperationCounts:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_instance_uids: list[str] = field(default_factory=list)
    # The first failure's reason, for the final Error Comment.
    first_failure: str | None = None

    def record(self, outcome: Outcome, sop_instance_uid: str, reason: str | None = None) -> None:
        self.remaining -= 1
        if outcome is Outcome.COMPLETED:
            self.completed += 1
        elif outcome is Outcome.WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_sop_instance_uids.append(sop_instance_uid)
            self.first_failure = self.first_failure or reason

    def fail_remaining(self, uids: Iterable[str], reason: str) -> None:
        for uid in uids:
            self.record(Outcome.FAILED, uid, reason)


# -- the request --------------------------------------------------------------------------


class RetrieveFailedError(Exception):
    """Answer the request with ``status`` and ``comment``; no sub-operation ran."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def decode_identifier(request: C_MOVE | C_GET, context: PresentationContext) -> Dataset:
    """The request's identifier, decoded in the context's transfer syntax."""
    raw = request.Identifier
    if raw is None:
        raise RetrieveFailedError(UNABLE_TO_PROCESS, "identifier missing")
    syntax = context.transfer_syntax[0]
    try:
        identifier = decode(raw, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        for _ in identifier:  # pydicom decodes lazily: let errors surface here
            pass
    except Exception as exc:
        raise RetrieveFailedError(UNABLE_TO_PROCESS, f"identifier not decodable: {exc}") from exc
    return identifier


def instances_to_send(
    query: QueryClient, model: InformationModel, identifier: Dataset
) -> list[RetrievableInstance]:
    """The instances a C-MOVE / C-GET identifier names, from the query-service."""
    try:
        level = query_level(identifier, model)
        request = RetrieveRequest(level=level, information_model=model, identifier=to_json(identifier))
    except IdentifierError as exc:
        raise RetrieveFailedError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    try:
        instances = query.retrieve(request)
    except InvalidQueryError as exc:
        raise RetrieveFailedError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, exc.reason) from exc
    except QueryUnavailableError as exc:
        logger.error("retrieve: query-service unavailable: %s", exc.reason)
        raise RetrieveFailedError(UNABLE_TO_CALCULATE_MATCHES, "query service unavailable") from exc
    if len(instances) > MAX_SUBOPERATIONS:
        raise RetrieveFailedError(
            UNABLE_TO_CALCULATE_MATCHES, f"{len(instances)} instances exceed 65535, retrieve by series"
        )
    return instances


# -- the instances as files -------------------------------------------------------------


class InstanceUnavailableError(Exception):
    """The object cannot be read; ``str(exc)`` is the reason."""


class InstanceArchivedError(InstanceUnavailableError):
    """The object sits in an archive tier: it needs a restore first."""


class InstanceFiles:
    """Each instance as a local Part 10 file, for as long as it is being sent
    (:class:`pacs_common.storage.local_files.StoredFiles`)."""

    def __init__(self, storage: StorageRegistry, spool_dir: Path | None = None) -> None:
        self._files = StoredFiles(storage, spool_dir, prefix="send-")

    @contextlib.contextmanager
    def local_file(self, instance: RetrievableInstance) -> Iterator[Path]:
        location = instance.location
        try:
            with self._files.local_file(location.tier, location.key) as path:
                yield path
        except UnreadableObjectError as exc:
            if exc.archived:
                raise InstanceArchivedError("instance archived: restore requested") from None
            raise InstanceUnavailableError(str(exc)) from None

    def spool_file(self) -> contextlib.AbstractContextManager[Path]:
        """A fresh temporary file in the spool directory, removed afterwards."""
        return self._files.spool_file()


# -- the association sub-operations go over ------------------------------------------------


class StoreTarget(Protocol):
    """An association on which this PACS is the storage SCU."""

    def accepted_transfer_syntaxes(self, sop_class_uid: str) -> list[UID]: ...

    def store(self, path: Path) -> int | None:
        """C-STORE the file; the response status, None when none came."""
        ...

    @property
    def alive(self) -> bool: ...


class AssociationTarget:
    """A pynetdicom association as a :class:`StoreTarget`: the C-MOVE
    sub-association, or the C-GET requestor's own association."""

    def __init__(
        self,
        assoc: Association,
        *,
        first_message_id: int,
        move_originator: tuple[str, int] | None = None,
    ) -> None:
        self._assoc = assoc
        self._next_id = first_message_id
        self._originator = move_originator

    def accepted_transfer_syntaxes(self, sop_class_uid: str) -> list[UID]:
        return [
            UID(cx.transfer_syntax[0])
            for cx in self._assoc.accepted_contexts
            if cx.abstract_syntax == sop_class_uid and cx.as_scu and cx.transfer_syntax
        ]

    def store(self, path: Path) -> int | None:
        message_id = self._next_id
        self._next_id = 1 if self._next_id >= 0xFFFF else self._next_id + 1
        originator_ae, originator_id = self._originator or (None, None)
        status = self._assoc.send_c_store(
            path, msg_id=message_id, originator_aet=originator_ae, originator_id=originator_id
        )
        value = status.get("Status")
        return None if value is None else int(value)

    @property
    def alive(self) -> bool:
        return bool(self._assoc.is_established)


def proposed_storage_contexts(instances: Sequence[RetrievableInstance]) -> list[PresentationContext]:
    """Contexts for a C-MOVE sub-association: per SOP class, one context per
    stored transfer syntax (so the destination can accept each as it is),
    plus one offering Explicit and Implicit VR Little Endian to fall back on.
    With more than :data:`MAX_CONTEXTS`, one context per SOP class offering
    all of them (the destination then picks one per class)."""
    by_class: dict[str, list[str | UID]] = {}
    for instance in instances:
        syntaxes: list[str | UID] = by_class.setdefault(instance.sop_class_uid, [])
        stored = UID(instance.transfer_syntax_uid)
        if stored not in syntaxes:
            syntaxes.append(stored)
    fallback: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts: list[PresentationContext] = []
    for sop_class, stored_syntaxes in by_class.items():
        contexts.extend(build_context(sop_class, [ts]) for ts in stored_syntaxes)
        if rest := [ts for ts in fallback if ts not in stored_syntaxes]:
            contexts.append(build_context(sop_class, rest))
    if len(contexts) <= MAX_CONTEXTS:
        return contexts
    merged = [
        build_context(sop_class, [*syntaxes, *(ts for ts in fallback if ts not in syntaxes)])
        for sop_class, syntaxes in by_class.items()
    ]
    return merged[:MAX_CONTEXTS]  # SOP classes beyond that fail: no context


# -- the sub-operations ---------------------------------------------------------------------


@dataclass
class RunResult:
    counts: SubOperationCounts
    cancelled: bool = False


class RestoreRequests(Protocol):
    """Asks for the restores of archived instances (blocking); see
    :func:`pacs_common.archive.requests.request_restores`."""

    def request(self, sop_instance_uids: Sequence[str], *, found_archived: bool = True) -> object: ...


class AccessRecords(Protocol):
    """Notes what was read (last access; no I/O on the call)."""

    def record(self, study_instance_uid: str, sop_instance_uids: Iterable[str]) -> None: ...


@dataclass
class _ToRestore:
    """Instances a run met that need a restore: found archived in storage,
    or listed NEARLINE / OFFLINE by the index."""

    archived: list[str] = field(default_factory=list)
    nearline: list[str] = field(default_factory=list)


class SubOperationSender:
    """Sends instances over a :class:`StoreTarget`, counting outcomes; asks
    for the restores of the archived ones and records what was sent."""

    def __init__(
        self,
        files: InstanceFiles,
        metrics: GatewayMetrics,
        operation: str,
        *,
        restores: RestoreRequests | None = None,
        access: AccessRecords | None = None,
    ) -> None:
        self._files = files
        self._metrics = metrics
        self._operation = operation
        self._restores = restores
        self._access = access

    def run(
        self,
        instances: Sequence[RetrievableInstance],
        target: StoreTarget,
        *,
        is_cancelled: Callable[[], bool],
        progress: Callable[[SubOperationCounts], None],
    ) -> RunResult:
        counts = SubOperationCounts(remaining=len(instances))
        to_restore = _ToRestore()
        sent: dict[str, list[str]] = {}
        try:
            for index, instance in enumerate(instances):
                if is_cancelled():
                    return RunResult(counts, cancelled=True)
                if not target.alive:
                    rest = [i.sop_instance_uid for i in instances[index:]]
                    counts.fail_remaining(rest, "association to the destination lost")
                    self._metrics.suboperations.labels(self._operation, Outcome.FAILED).inc(len(rest))
                    break
                outcome, reason = self._send(instance, target, to_restore)
                counts.record(outcome, instance.sop_instance_uid, reason)
                self._metrics.suboperations.labels(self._operation, outcome).inc()
                if outcome is Outcome.FAILED:
                    logger.warning(
                        "%s sub-operation failed: %s",
                        self._operation,
                        reason,
                        extra={"sop_instance_uid": instance.sop_instance_uid},
                    )
                else:
                    sent.setdefault(instance.study_instance_uid, []).append(instance.sop_instance_uid)
                progress(counts)
            return RunResult(counts)
        finally:
            self._after_run(to_restore, sent)

    def _after_run(self, to_restore: _ToRestore, sent: dict[str, list[str]]) -> None:
        if self._access is not None:
            for study, uids in sent.items():
                self._access.record(study, uids)
        if self._restores is None:
            return
        for uids, found_archived in ((to_restore.archived, True), (to_restore.nearline, False)):
            if not uids:
                continue
            try:
                self._restores.request(uids, found_archived=found_archived)
            except Exception:
                # The sub-operations failed either way; the next retrieve asks again.
                logger.exception("%s: restore request failed", self._operation)

    def _send(
        self, instance: RetrievableInstance, target: StoreTarget, to_restore: _ToRestore
    ) -> tuple[Outcome, str | None]:
        if instance.availability != ONLINE:
            if instance.availability in RESTORABLE:
                to_restore.nearline.append(instance.sop_instance_uid)
                return Outcome.FAILED, f"instance {instance.availability.lower()}: restore requested"
            return Outcome.FAILED, f"instance {instance.availability.lower()}, not online"
        accepted = target.accepted_transfer_syntaxes(instance.sop_class_uid)
        if not accepted:
            return Outcome.FAILED, f"no storage context for {UID(instance.sop_class_uid).name}"
        syntax = choose_transfer_syntax(instance.transfer_syntax_uid, accepted)
        if syntax is None:
            stored = UID(instance.transfer_syntax_uid).name
            return Outcome.FAILED, f"cannot convert {stored} to an accepted syntax"
        try:
            with self._files.local_file(instance) as path:
                if syntax == instance.transfer_syntax_uid:
                    return self._store(target, path)
                with self._files.spool_file() as converted:
                    try:
                        transcode_file(path, converted, syntax)
                    except TranscodeError as exc:
                        self._metrics.transcodes.labels("failed").inc()
                        return Outcome.FAILED, str(exc)
                    self._metrics.transcodes.labels("converted").inc()
                    return self._store(target, converted)
        except InstanceArchivedError as exc:
            to_restore.archived.append(instance.sop_instance_uid)
            return Outcome.FAILED, str(exc)
        except InstanceUnavailableError as exc:
            return Outcome.FAILED, str(exc)

    @staticmethod
    def _store(target: StoreTarget, path: Path) -> tuple[Outcome, str | None]:
        try:
            status = target.store(path)
        except (ValueError, AttributeError, RuntimeError, OSError) as exc:
            return Outcome.FAILED, f"C-STORE not sent: {exc}"
        outcome = classify_store_status(status)
        if outcome is Outcome.FAILED:
            reason = "no C-STORE response" if status is None else f"C-STORE status 0x{status:04X}"
            return outcome, reason
        return outcome, None


# -- the responses ----------------------------------------------------------------------------


def _failed_uid_list(uids: Sequence[str]) -> list[str]:
    """As many UIDs as fit into one UI element (the rest are counted only)."""
    kept: list[str] = []
    size = 0
    for uid in uids:
        size += len(uid) + 1
        if size > _FAILED_LIST_MAX_BYTES:
            break
        kept.append(uid)
    return kept


class RetrieveResponder:
    """Sends the responses of one C-MOVE or C-GET request."""

    def __init__(self, assoc: Association, request: C_MOVE | C_GET, context: PresentationContext) -> None:
        self._assoc = assoc
        self._request = request
        self._context = context
        self.final_status: int | None = None

    @property
    def message_id(self) -> int:
        return int(self._request.MessageID or 0)

    def is_cancelled(self) -> bool:
        """Whether the peer sent C-CANCEL for this request (pynetdicom's DIMSE
        layer files C-CANCEL-RQs by the Message ID they cancel)."""
        return self.message_id in self._assoc.dimse.cancel_req

    def pending(self, counts: SubOperationCounts) -> None:
        if not self._assoc.is_established:
            return
        response = self._response(PENDING)
        self._set_counts(response, counts, remaining=True)
        self._assoc.dimse.send_msg(response, self._context_id)

    def final(
        self,
        status: int,
        counts: SubOperationCounts | None = None,
        *,
        comment: str | None = None,
    ) -> None:
        self.final_status = status
        if not self._assoc.is_established:
            return
        response = self._response(status)
        if counts is not None:
            self._set_counts(response, counts, remaining=status == CANCELLED)
            if status != SUCCESS:
                identifier = Dataset()
                identifier.FailedSOPInstanceUIDList = _failed_uid_list(counts.failed_sop_instance_uids)
                response.Identifier = BytesIO(self._encode(identifier))
        if comment and status not in (SUCCESS, PENDING, CANCELLED, SOME_SUBOPERATIONS_FAILED):
            response.ErrorComment = comment[:_ERROR_COMMENT_MAX]  # type: ignore[assignment]
        self._assoc.dimse.send_msg(response, self._context_id)

    def complete(self, result: RunResult) -> None:
        """The final response after the sub-operations ran."""
        counts = result.counts
        if result.cancelled:
            self.final(CANCELLED, counts)
        elif counts.failed == 0 and counts.warning == 0:
            self.final(SUCCESS, counts)
        elif counts.completed == 0 and counts.warning == 0:
            self.final(UNABLE_TO_PERFORM_SUBOPERATIONS, counts, comment=counts.first_failure)
        else:
            self.final(SOME_SUBOPERATIONS_FAILED, counts)

    @property
    def _context_id(self) -> int:
        return int(self._context.context_id or 0)

    def _response(self, status: int) -> C_MOVE | C_GET:
        response = C_MOVE() if isinstance(self._request, C_MOVE) else C_GET()
        response.MessageIDBeingRespondedTo = self._request.MessageID
        response.AffectedSOPClassUID = self._request.AffectedSOPClassUID
        response.Status = status
        return response

    @staticmethod
    def _set_counts(response: C_MOVE | C_GET, counts: SubOperationCounts, *, remaining: bool) -> None:
        if remaining:
            response.NumberOfRemainingSuboperations = max(counts.remaining, 0)
        response.NumberOfCompletedSuboperations = counts.completed
        response.NumberOfFailedSuboperations = counts.failed
        response.NumberOfWarningSuboperations = counts.warning

    def _encode(self, dataset: Dataset) -> bytes:
        syntax = UID(self._context.transfer_syntax[0])
        encoded = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        if encoded is None:
            raise ValueError("could not encode the response identifier")
        return encoded


def answer_retrieve(
    operation: str, metrics: GatewayMetrics, responder: RetrieveResponder, work: Callable[[], None]
) -> None:
    """Run one C-MOVE / C-GET: a refusal (:class:`RetrieveFailedError`) or a
    crash in ``work`` becomes the final response, and the outcome is counted."""
    started = time.perf_counter()
    try:
        work()
    except RetrieveFailedError as exc:
        logger.warning("%s refused: %s", operation, exc.comment)
        responder.final(exc.status, comment=exc.comment)
    except Exception:
        logger.exception("%s failed", operation)
        if responder.final_status is None:
            responder.final(UNABLE_TO_PROCESS, comment="internal error")
    finally:
        status = responder.final_status
        metrics.operations.labels(operation, "none" if status is None else f"0x{status:04X}").inc()
        metrics.retrieve_seconds.labels(operation).observe(time.perf_counter() - started)
