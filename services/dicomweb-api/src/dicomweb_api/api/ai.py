"""``/ai``: the rules that send stable studies to AI inference endpoints
(``/ai/rules``) and the analyses they started (``/ai/requests``), see
``pacs_common.ai``; the ai-connector runs them."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from dicomweb_api.api.models import Page
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.ai import (
    AiRequest,
    AiRequestRepository,
    AiRequestState,
    AiRule,
    AiRuleCreate,
    AiRuleExistsError,
    AiRuleRepository,
)

__all__ = ["create_router"]

TOTAL_COUNT_HEADER: Final = "X-Total-Count"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000

Context = Annotated[ApiContext, Depends(get_context)]
ItemId = Annotated[int, Path(ge=1)]
_RULE_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no such rule"}}
_CONFLICT: Final[dict[int | str, dict[str, Any]]] = {409: {"description": "a rule with this name exists"}}


def _no_rule(rule_id: int) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no AI rule {rule_id}")


def create_router() -> APIRouter:
    router = APIRouter(prefix="/ai", tags=["ai"], dependencies=[Depends(require(Permission.ADMIN))])

    @router.get("/rules", response_model=list[AiRule], summary="List AI rules")
    async def list_rules(context: Context) -> list[AiRule]:
        return await AiRuleRepository(context.pool).list()

    @router.post("/rules", response_model=AiRule, status_code=201, summary="Add a rule", responses=_CONFLICT)
    async def add_rule(context: Context, rule: AiRuleCreate) -> AiRule:
        try:
            return await AiRuleRepository(context.pool).add(rule)
        except AiRuleExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    @router.get("/rules/{rule_id}", response_model=AiRule, summary="One rule", responses=_RULE_NOT_FOUND)
    async def get_rule(context: Context, rule_id: ItemId) -> AiRule:
        rule = await AiRuleRepository(context.pool).get(rule_id)
        if rule is None:
            raise _no_rule(rule_id)
        return rule

    @router.put(
        "/rules/{rule_id}",
        response_model=AiRule,
        summary="Replace a rule",
        responses={**_RULE_NOT_FOUND, **_CONFLICT},
    )
    async def replace_rule(context: Context, rule_id: ItemId, rule: AiRuleCreate) -> AiRule:
        try:
            replaced = await AiRuleRepository(context.pool).replace(rule_id, rule)
        except AiRuleExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        if replaced is None:
            raise _no_rule(rule_id)
        return replaced

    @router.delete(
        "/rules/{rule_id}",
        status_code=204,
        summary="Remove a rule (and its requests)",
        responses=_RULE_NOT_FOUND,
    )
    async def remove_rule(context: Context, rule_id: ItemId) -> Response:
        if not await AiRuleRepository(context.pool).remove(rule_id):
            raise _no_rule(rule_id)
        return Response(status_code=204)

    @router.get("/requests", response_model=Page[AiRequest], summary="List AI requests, newest first")
    async def list_requests(
        *,
        context: Context,
        response: Response,
        state: Annotated[
            list[AiRequestState] | None, Query(description="only these states (repeatable)")
        ] = None,
        rule_id: Annotated[int | None, Query(ge=1)] = None,
        study_instance_uid: Annotated[str | None, Query(alias="StudyInstanceUID", max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Page[AiRequest]:
        total, items = await AiRequestRepository(context.pool).list(
            states=None if state is None else frozenset(state),
            rule_id=rule_id,
            study_instance_uid=study_instance_uid,
            limit=limit,
            offset=offset,
        )
        response.headers[TOTAL_COUNT_HEADER] = str(total)
        return Page[AiRequest](total=total, limit=limit, offset=offset, items=items)

    @router.get(
        "/requests/{request_id}",
        response_model=AiRequest,
        summary="One AI request",
        responses={404: {"description": "no such request"}},
    )
    async def get_request(context: Context, request_id: ItemId) -> AiRequest:
        found = await AiRequestRepository(context.pool).get(request_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no AI request {request_id}")
        return found

    return router
