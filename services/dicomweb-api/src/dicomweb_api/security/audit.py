"""The FastAPI side of the audit trail (the trail itself is
:mod:`pacs_common.audit`): who the HTTP caller is (:func:`http_actor`), the
dependency reading ``app.state.audit``, and :func:`audited`, the one event a
DICOMweb / REST request leaves once its outcome is known.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

from fastapi import Depends, HTTPException, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomweb_api.security.dependencies import Principal
from pacs_common.audit import (
    AuditAction,
    AuditActor,
    AuditEventId,
    AuditLog,
    AuditObject,
    AuditOutcome,
)
from pacs_common.audit.models import ObjectType

__all__ = [
    "AuditAfterResponse",
    "AuditScope",
    "InstancesAccessed",
    "StudyDeleted",
    "archive_accessed",
    "audited",
    "get_audit_log",
    "http_actor",
    "instances_accessed",
    "outcome_of_status",
    "query_objects",
    "study_deleted",
    "study_objects",
]

logger = logging.getLogger(__name__)


def get_audit_log(request: Request) -> AuditLog:
    """The app's audit log (``app.state.audit``), as a dependency."""
    audit: AuditLog = request.app.state.audit
    return audit


def http_actor(
    principal: Principal | None,
    request: Request | None = None,
    *,
    actor: str | None = None,
    actor_method: str | None = None,
) -> AuditActor:
    """The requesting participant: ``principal`` (else the one the request was
    authenticated as), or ``actor`` / ``actor_method`` when given; the
    address is the request's client."""
    if principal is None and request is not None:
        principal = getattr(request.state, "principal", None)
    address = request.client.host if request is not None and request.client is not None else None
    return AuditActor(
        name=actor or (principal.subject if principal else "unknown"),
        method=actor_method or (principal.method if principal else "unknown"),
        roles=tuple(sorted(r.value for r in principal.roles)) if principal else (),
        address=address,
    )


def outcome_of_status(status_code: int) -> AuditOutcome:
    """2xx/3xx success, 4xx minor failure (refused), 5xx serious failure."""
    if status_code < 400:
        return AuditOutcome.SUCCESS
    if status_code < 500:
        return AuditOutcome.MINOR_FAILURE
    return AuditOutcome.SERIOUS_FAILURE


@dataclass
class AuditScope:
    """What a request learns while it runs and wants in its audit event."""

    objects: list[AuditObject] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # A failure the handler answered itself (without raising), e.g. a STOW 409.
    outcome: AuditOutcome | None = None
    # The app's audit log; None when the app runs without one.
    log: AuditLog | None = None

    def add(self, type_: ObjectType, uid: str | None, name: str | None = None) -> None:
        if uid and not any(o.type == type_ and o.id == uid for o in self.objects):
            self.objects.append(AuditObject(type=type_, id=uid, name=name))

    async def add_study(self, study: str) -> None:
        """Name ``study`` and its patient, looked up now (before a deletion
        removes them from the index); nothing is looked up without an audit log."""
        self.add("study", study)
        if self.log is not None:
            for patient in await self.log.patients_of([study]):
                self.add(patient.type, patient.id, patient.name)


@asynccontextmanager
async def audited(
    request: Request,
    event: AuditEventId,
    action: AuditAction,
    *,
    objects: Sequence[AuditObject] = (),
    details: dict[str, Any] | None = None,
) -> AsyncIterator[AuditScope]:
    """Records one audit event for the enclosed work, after it ended: success,
    or the failure its exception stands for.  The patients of the studies
    named are looked up.  An audit log that cannot write is logged and never
    changes the answer (the app may run without one: ``app.state.audit`` None).
    """
    audit: AuditLog | None = getattr(request.app.state, "audit", None)
    scope = AuditScope(
        objects=list(objects), details={"path": request.url.path, **(details or {})}, log=audit
    )
    outcome = AuditOutcome.SUCCESS
    try:
        yield scope
    except HTTPException as exc:
        outcome = outcome_of_status(exc.status_code)
        scope.details["status"] = exc.status_code
        raise
    except BaseException:
        outcome = AuditOutcome.SERIOUS_FAILURE
        raise
    finally:
        if audit is not None:
            final = scope.outcome if scope.outcome is not None else outcome
            actor = http_actor(None, request)

            async def write() -> None:
                try:
                    await audit.record(
                        event,
                        action,
                        final,
                        actor=actor,
                        objects=scope.objects,
                        details=scope.details,
                        resolve_patients=True,
                    )
                except Exception as exc:
                    logger.error(
                        "audit event not written: %s",
                        exc,
                        extra={"event_id": event.value, "path": request.url.path},
                    )

            pending: list[Callable[[], Awaitable[None]]] | None = getattr(request.state, PENDING_AUDIT, None)
            if pending is None:  # no AuditAfterResponse middleware: write now
                await write()
            else:
                pending.append(write)


#: ``request.state`` attribute holding the audit writes of a request.
PENDING_AUDIT: Final = "pending_audit"


class AuditAfterResponse:
    """ASGI middleware: the audit events of a request (patient lookup and
    insert) are written once the response has been sent, so no client —
    a viewer fetching hundreds of frames — waits for the audit trail."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pending: list[Callable[[], Awaitable[None]]] = []
        scope.setdefault("state", {})[PENDING_AUDIT] = pending
        try:
            await self.app(scope, receive, send)
        finally:
            for write in pending:
                await write()


# Q/R Study Root C-FIND: the SOP class a QIDO-RS query stands for.
_STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
# QIDO-RS keys, and the management API's filters.
_PATIENT_ID_KEYS: Final = ("PatientID", "00100020", "patient_id")
_STUDY_UID_KEYS: Final = ("StudyInstanceUID", "0020000D", "study_instance_uid")


def query_objects(request: Request, path_study: str | None = None) -> list[AuditObject]:
    """The objects of a search (QIDO-RS, or a listing of the management API):
    the query itself, and the patients and studies it names (in the path or
    as matching keys; patterns name nobody)."""
    params = request.query_params
    objects = [
        AuditObject(type="query", id=_STUDY_ROOT_FIND, query=f"{request.url.path}?{request.url.query}")
    ]
    named: list[tuple[ObjectType, str]] = [
        ("patient", v) for k in _PATIENT_ID_KEYS for v in params.getlist(k)
    ]
    if path_study:
        named.append(("study", path_study))
    named += [("study", v) for k in _STUDY_UID_KEYS for v in params.getlist(k)]
    for type_, value in named:
        for item in value.replace("\\", ",").split(","):
            if item.strip() and "*" not in item and "?" not in item:
                objects.append(AuditObject(type=type_, id=item.strip()))
    return objects


def study_objects(study: str) -> list[AuditObject]:
    """The study a WADO / STOW / DELETE URL names."""
    return [AuditObject(type="study", id=study)]


async def instances_accessed(request: Request) -> AsyncIterator[AuditScope]:
    """A route dependency auditing a WADO-RS read ("DICOM Instances Accessed"):
    the study, series and instance of the path, with the outcome of the
    request.  Declare it after the permission dependency (the actor is the
    authenticated principal)."""
    path = request.path_params
    study = path.get("study")
    details: dict[str, Any] = {k: path[k] for k in ("series", "instance", "frame", "frame_list") if k in path}
    async with audited(
        request,
        AuditEventId.INSTANCES_ACCESSED,
        AuditAction.READ,
        objects=study_objects(study) if study else (),
        details=details,
    ) as scope:
        yield scope


InstancesAccessed = Annotated[AuditScope, Depends(instances_accessed)]


async def study_deleted(request: Request) -> AsyncIterator[AuditScope]:
    """A route dependency auditing a deletion ("DICOM Study Deleted", Delete);
    the study of the path (and its patient) are named before the handler
    runs; the handler adds what it learns (see ``delete.record_deletion``)."""
    async with audited(request, AuditEventId.STUDY_DELETED, AuditAction.DELETE) as scope:
        study = request.path_params.get("study")
        if study:
            await scope.add_study(study)
        yield scope


StudyDeleted = Annotated[AuditScope, Depends(study_deleted)]

_ARCHIVE_ENTITIES: Final[dict[str, ObjectType]] = {
    "study_instance_uid": "study",
    "series_instance_uid": "series",
    "sop_instance_uid": "instance",
}


async def archive_accessed(request: Request) -> AsyncIterator[AuditScope]:
    """A route dependency auditing the management API's archive reads: a
    listing is a Query, the detail of a study, series or instance an
    access to it (Instances Accessed, Read)."""
    path = request.path_params
    named = [AuditObject(type=_ARCHIVE_ENTITIES[k], id=v) for k, v in path.items() if k in _ARCHIVE_ENTITIES]
    if named:
        event, action, objects = AuditEventId.INSTANCES_ACCESSED, AuditAction.READ, named
    else:
        event, action, objects = AuditEventId.QUERY, AuditAction.EXECUTE, query_objects(request)
    async with audited(request, event, action, objects=objects) as scope:
        yield scope
