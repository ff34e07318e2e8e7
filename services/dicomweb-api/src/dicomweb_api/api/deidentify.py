"""``POST /studies/{uid}/deidentify``: a de-identified copy of a study, stored
as a new study.

Every instance of the study is read from where the index says it is, copied
to a spool file, de-identified (PS3.15 Annex E, :mod:`pacs_common.dicom.deidentify`)
by ONE :class:`~pacs_common.dicom.deidentify.Deidentifier` so that UIDs and
references stay consistent across the study, written as a Part 10 file and
handed to the same :class:`~pacs_common.receiving.InstanceReceiver` as STOW-RS
and C-STORE (write-once storage, ingest message with confirms).  The new
study is indexed by the ingest worker as any other.

The salt is the deployment's secret (``PACS_DEIDENTIFY_SALT``); without it
the endpoint answers 503.  The request's ``scope`` is mixed with the salt: a
second copy of the same study under another scope gets other UIDs, so it
never collides with the first in write-once storage.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final
from urllib.parse import quote

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ValidationError
from pydicom.errors import InvalidDicomError

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, Principal, require
from dicomweb_api.security.audit import AuditScope, audited
from dicomweb_api.urls import dicomweb_base, study_url
from pacs_common.audit import AuditAction, AuditEventId, AuditObject, AuditOutcome
from pacs_common.dicom.deidentify import MIN_SALT_BYTES, Deidentifier, DeidentifyOptions, DeidentifySettings
from pacs_common.dicom.received import InvalidDatasetError
from pacs_common.messaging.broker import PublishError
from pacs_common.messaging.models import IngestSource
from pacs_common.receiving import InstanceReceiver
from pacs_common.storage import ObjectArchivedError, ObjectNotFoundError, StorageError, StorageRegistry

__all__ = ["DeidentifiedStudy", "DeidentifyFailure", "create_router"]

logger = logging.getLogger(__name__)

Context = Annotated[ApiContext, Depends(get_context)]
Exporter = Annotated[Principal, Depends(require(Permission.EXPORT))]
Uid = Annotated[str, PathParam(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]

# Instances de-identified and stored this many at a time.
_CONCURRENCY: Final = 4

_INSTANCES_SQL: Final = """
SELECT i.sop_instance_uid, l.tier, l.key
  FROM instance AS i
  JOIN series AS se ON se.pk = i.series_fk
  JOIN study AS st ON st.pk = se.study_fk
  JOIN instance_location AS l ON l.instance_fk = i.pk
 WHERE st.study_instance_uid = $1
 ORDER BY se.series_instance_uid, i.instance_number NULLS LAST, i.sop_instance_uid
"""


class DeidentifyFailure(BaseModel):
    """An instance of the original study that was not copied, and why."""

    sop_instance_uid: str
    reason: str


class DeidentifiedStudy(BaseModel):
    """The de-identified copy.  It is indexed by the ingest worker, so the
    URLs answer once the ingest queue has been worked off."""

    source_study_instance_uid: str
    study_instance_uid: str
    instances_stored: int
    instances_failed: int
    failures: list[DeidentifyFailure]
    # WADO-RS: the new study; QIDO-RS: a search for it.
    retrieve_url: str
    query_url: str


@dataclass(frozen=True, slots=True)
class _Source:
    sop_instance_uid: str
    tier: str
    key: str


@dataclass(frozen=True, slots=True)
class _Copier:
    """De-identifies one stored instance and stores the result (blocking: run in a thread)."""

    storage: StorageRegistry
    receiver: InstanceReceiver
    deidentifier: Deidentifier
    source: IngestSource
    spool: Path

    def copy(self, index: int, instance: _Source) -> DeidentifyFailure | None:
        try:
            storage = self.storage.get(instance.tier)
        except KeyError:
            return self._failure(instance, f"storage tier {instance.tier} is not configured")
        original = self.spool / f"{index}.original.dcm"
        copy = self.spool / f"{index}.dcm"
        try:
            with storage.open(instance.key) as stream, original.open("wb") as out:
                shutil.copyfileobj(stream, out)
            dataset = pydicom.dcmread(original)
            deidentified = self.deidentifier.deidentify(dataset)
            deidentified.save_as(copy, enforce_file_format=True)
            original.unlink()
            self.receiver.receive(copy, self.source)
        except ObjectArchivedError:
            return self._failure(instance, "the object is archived and must be restored first")
        except ObjectNotFoundError:
            return self._failure(instance, "the stored object is missing")
        except StorageError as exc:
            logger.error("de-identification: storage failed: %s", exc)
            return self._failure(instance, "storage unavailable")
        except PublishError as exc:
            logger.error("de-identification: publishing the ingest message failed: %s", exc)
            return self._failure(instance, "ingest queue unavailable")
        except (InvalidDatasetError, InvalidDicomError) as exc:
            return self._failure(instance, f"not a readable DICOM object: {exc}")
        except Exception:
            logger.exception("de-identification of an instance failed")
            return self._failure(instance, "internal error")
        finally:
            original.unlink(missing_ok=True)
            copy.unlink(missing_ok=True)
        return None

    @staticmethod
    def _failure(instance: _Source, reason: str) -> DeidentifyFailure:
        return DeidentifyFailure(sop_instance_uid=instance.sop_instance_uid, reason=reason)


def _deidentifier(options: DeidentifyOptions) -> Deidentifier:
    try:
        salt = DeidentifySettings().salt_bytes()  # from the environment
    except ValidationError:
        raise HTTPException(
            status_code=503,
            detail="de-identification is not configured: PACS_DEIDENTIFY_SALT must be set "
            f"(at least {MIN_SALT_BYTES} bytes)",
        ) from None
    return Deidentifier(salt, options)


def _make_spool_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="deidentify-", dir=parent))


async def _copy_all(copier: _Copier, instances: list[_Source]) -> list[DeidentifyFailure | None]:
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(index: int, instance: _Source) -> DeidentifyFailure | None:
        async with limit:
            return await asyncio.to_thread(copier.copy, index, instance)

    return list(await asyncio.gather(*(one(n, i) for n, i in enumerate(instances))))


async def _deidentify_study(
    request: Request,
    context: ApiContext,
    principal: Principal,
    study: str,
    *,
    options: DeidentifyOptions,
    scope: AuditScope,
) -> DeidentifiedStudy:
    deidentifier = _deidentifier(options)
    rows = await context.pool.fetch(_INSTANCES_SQL, study)
    if not rows:
        raise HTTPException(status_code=404, detail=f"no study {study}")
    instances = [_Source(r["sop_instance_uid"], r["tier"], r["key"]) for r in rows]
    new_study = deidentifier.uids.map(study)
    scope.add("study", new_study)
    client = request.client
    source = IngestSource(protocol="import", peer=f"{client.host}:{client.port}" if client else None)
    spool = await asyncio.to_thread(_make_spool_dir, context.settings.spool_dir)
    try:
        copier = _Copier(context.storage, context.receiver, deidentifier, source, spool)
        outcomes = await _copy_all(copier, instances)
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, True)

    failures = [f for f in outcomes if f is not None]
    base = dicomweb_base(request, context.settings)
    result = DeidentifiedStudy(
        source_study_instance_uid=study,
        study_instance_uid=new_study,
        instances_stored=len(outcomes) - len(failures),
        instances_failed=len(failures),
        failures=failures,
        retrieve_url=study_url(base, new_study),
        query_url=f"{base}/studies?StudyInstanceUID={quote(new_study, safe='')}",
    )
    logger.info(
        "de-identified copy of a study",
        extra={
            "subject": principal.subject,
            "study_instance_uid": study,
            "new_study_instance_uid": new_study,
            "instances_stored": result.instances_stored,
            "instances_failed": result.instances_failed,
        },
    )
    scope.details.update(
        operation="deidentify",
        instances_stored=result.instances_stored,
        instances_failed=result.instances_failed,
    )
    if not result.instances_stored:  # audited as a serious failure
        raise HTTPException(
            status_code=503,
            detail={"reason": "no instance of the study could be copied", **result.model_dump()},
        )
    if failures:
        scope.outcome = AuditOutcome.MINOR_FAILURE
    return result


def create_router() -> APIRouter:
    router = APIRouter(tags=["de-identification"])

    @router.post(
        "/studies/{study_instance_uid}/deidentify",
        status_code=201,
        response_model=DeidentifiedStudy,
        summary="Store a de-identified copy of a study as a new study (PS3.15 Annex E)",
        responses={
            404: {"description": "not in the archive"},
            503: {"description": "de-identification not configured, or no instance could be copied"},
        },
    )
    async def deidentify_study(
        request: Request,
        context: Context,
        principal: Exporter,
        study_instance_uid: Uid,
        options: DeidentifyOptions | None = None,
    ) -> DeidentifiedStudy:
        async with audited(
            request,
            AuditEventId.EXPORT,
            AuditAction.READ,
            objects=[AuditObject(type="study", id=study_instance_uid)],
        ) as scope:
            return await _deidentify_study(
                request,
                context,
                principal,
                study_instance_uid,
                options=options or DeidentifyOptions(),
                scope=scope,
            )

    return router
