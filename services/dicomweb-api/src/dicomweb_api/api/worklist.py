"""``/worklist`` (Modality Worklist items) and ``/mpps`` (performed steps).

The same rows the MWL SCP serves and MPPS N-CREATE/N-SET write
(``pacs_common.workflow``); an item posted here is what a modality's
worklist C-FIND finds.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from dicomweb_api.api.models import ScheduledStepCreate, WorklistItemCreate
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.workflow import dicom_json as dj
from pacs_common.workflow import mpps
from pacs_common.workflow.mpps import MppsRecord
from pacs_common.workflow.worklist import (
    WorklistItem,
    WorklistItemError,
    add_item,
    get_item,
    list_items,
    remove_items,
)

__all__ = ["build_item", "create_router"]

MAX_LIMIT: Final = 10_000
Context = Annotated[ApiContext, Depends(get_context)]
Status = Annotated[str | None, Query(max_length=16, description="only this status, e.g. SCHEDULED")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]

# model field → (tag, VR): top level of the item
_TOP: Final = {
    "patient_id": (dj.PATIENT_ID, "LO"),
    "patient_name": (dj.PATIENT_NAME, "PN"),
    "patient_birth_date": (dj.PATIENT_BIRTH_DATE, "DA"),
    "patient_sex": (dj.PATIENT_SEX, "CS"),
    "accession_number": (dj.ACCESSION_NUMBER, "SH"),
    "requested_procedure_id": (dj.REQUESTED_PROCEDURE_ID, "SH"),
    "requested_procedure_description": (dj.REQUESTED_PROCEDURE_DESCRIPTION, "LO"),
    "study_instance_uid": (dj.STUDY_INSTANCE_UID, "UI"),
    "referring_physician_name": (dj.REFERRING_PHYSICIAN_NAME, "PN"),
}
# model field → (tag, VR): in a Scheduled Procedure Step Sequence item
_STEP: Final = {
    "modality": (dj.MODALITY, "CS"),
    "scheduled_station_ae_title": (dj.SCHEDULED_STATION_AE_TITLE, "AE"),
    "scheduled_station_name": (dj.SCHEDULED_STATION_NAME, "SH"),
    "start_date": (dj.SPS_START_DATE, "DA"),
    "start_time": (dj.SPS_START_TIME, "TM"),
    "sps_id": (dj.SPS_ID, "SH"),
    "description": (dj.SPS_DESCRIPTION, "LO"),
    "performing_physician_name": (dj.SCHEDULED_PERFORMING_PHYSICIAN_NAME, "PN"),
}


def _element(vr: str, value: str) -> dict[str, Any]:
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": [value]}


def _step(given: dict[str, Any], step: ScheduledStepCreate | None) -> dict[str, Any]:
    item = copy.deepcopy(given)
    if step is not None:
        for field, (tag, vr) in _STEP.items():
            value = getattr(step, field)
            if value:
                item[tag] = _element(vr, value)
    return item


def build_item(body: WorklistItemCreate) -> dict[str, Any]:
    """The item ``body`` describes, as DICOM JSON (fields over ``attributes``)."""
    item: dict[str, Any] = copy.deepcopy(body.attributes or {})
    for field, (tag, vr) in _TOP.items():
        value = getattr(body, field)
        if value:
            item[tag] = _element(vr, value)
    sequence = item.get(dj.SCHEDULED_PROCEDURE_STEP_SEQUENCE)
    given: list[Any] = (sequence.get("Value") or []) if isinstance(sequence, dict) else []
    if not all(isinstance(entry, dict) for entry in given):
        raise WorklistItemError("Scheduled Procedure Step Sequence items must be DICOM JSON objects")
    if body.steps:
        steps = [
            _step(given[index] if index < len(given) else {}, step) for index, step in enumerate(body.steps)
        ]
    else:
        steps = [_step(entry, None) for entry in given] or [{}]
    item[dj.SCHEDULED_PROCEDURE_STEP_SEQUENCE] = {"vr": "SQ", "Value": steps}
    try:
        # What the MWL SCP will do with it: refuse now what it could not send.
        dj.to_dataset(item)
    except Exception as exc:
        raise WorklistItemError(f"not valid DICOM JSON ({type(exc).__name__}: {exc})") from exc
    return item


def create_router() -> APIRouter:
    router = APIRouter(tags=["worklist"], dependencies=[Depends(require(Permission.WORKFLOW))])

    @router.get("/worklist", response_model=list[WorklistItem], summary="Worklist items, earliest first")
    async def list_worklist(
        context: Context, status: Status = None, limit: Limit = 1000
    ) -> list[WorklistItem]:
        return await list_items(context.pool, status=status, limit=limit)

    @router.post(
        "/worklist",
        response_model=list[WorklistItem],
        status_code=201,
        summary="Schedule a procedure: one item per Scheduled Procedure Step",
        responses={422: {"description": "the item cannot be scheduled as given"}},
    )
    async def add_worklist_item(context: Context, body: WorklistItemCreate) -> list[WorklistItem]:
        try:
            return await add_item(context.pool, build_item(body))
        except WorklistItemError as exc:
            raise HTTPException(status_code=422, detail=f"cannot schedule the item: {exc}") from exc

    @router.get(
        "/worklist/{item_id}",
        response_model=WorklistItem,
        summary="One worklist item",
        responses={404: {"description": "no such item"}},
    )
    async def get_worklist_item(context: Context, item_id: Annotated[int, Path(ge=1)]) -> WorklistItem:
        item = await get_item(context.pool, item_id)
        if item is None:
            raise HTTPException(status_code=404, detail=f"no worklist item {item_id}")
        return item

    @router.delete(
        "/worklist/{item_id}",
        status_code=204,
        summary="Remove a worklist item",
        responses={404: {"description": "no such item"}},
    )
    async def remove_worklist_item(context: Context, item_id: Annotated[int, Path(ge=1)]) -> Response:
        if await remove_items(context.pool, pks=[item_id]) == 0:
            raise HTTPException(status_code=404, detail=f"no worklist item {item_id}")
        return Response(status_code=204)

    @router.get("/mpps", response_model=list[MppsRecord], summary="Performed procedure steps, newest first")
    async def list_mpps(context: Context, status: Status = None, limit: Limit = 1000) -> list[MppsRecord]:
        return await mpps.list_steps(context.pool, status=status, limit=limit)

    @router.get(
        "/mpps/{sop_instance_uid}",
        response_model=MppsRecord,
        summary="One performed procedure step",
        responses={404: {"description": "no such step"}},
    )
    async def get_mpps(
        context: Context,
        sop_instance_uid: Annotated[str, Path(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)],
    ) -> MppsRecord:
        record = await mpps.get(context.pool, sop_instance_uid)
        if record is None:
            raise HTTPException(status_code=404, detail=f"no MPPS {sop_instance_uid}")
        return record

    return router
