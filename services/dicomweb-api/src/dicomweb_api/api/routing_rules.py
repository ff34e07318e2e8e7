"""``/routing-rules``: where received instances are forwarded
(``pacs_common.routing``); destinations must be registered nodes that may
receive instances.  A rule reacts to ``instance.stored`` (the default) or
``study.stable``; the forwarder records each match as a ``forward`` job
(``/jobs?kind=forward``)."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response

from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.routing import (
    DestinationQueue,
    RoutingRule,
    RoutingRuleCreate,
    RoutingRuleRepository,
    RoutingTrigger,
    RuleExistsError,
    forwarding_queues,
    unknown_destinations,
)

__all__ = ["create_router"]

Context = Annotated[ApiContext, Depends(get_context)]
RuleId = Annotated[int, Path(ge=1)]
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no such rule"}}
_WRITE_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    409: {"description": "a rule with this name exists"},
    422: {"description": "a destination is not a registered node allowed to receive instances"},
}


async def _check_destinations(context: ApiContext, rule: RoutingRuleCreate) -> None:
    unknown = await unknown_destinations(context.pool, rule.destinations)
    if unknown:
        raise HTTPException(
            status_code=422,
            detail=f"not registered nodes allowed to receive instances: {', '.join(unknown)}",
        )


def create_router() -> APIRouter:
    router = APIRouter(
        prefix="/routing-rules", tags=["routing"], dependencies=[Depends(require(Permission.ADMIN))]
    )

    @router.get("", response_model=list[RoutingRule], summary="List routing rules in evaluation order")
    async def list_rules(
        context: Context,
        trigger: Annotated[RoutingTrigger | None, Query(description="only the rules of this event")] = None,
    ) -> list[RoutingRule]:
        return await RoutingRuleRepository(context.pool).list(trigger=trigger)

    @router.get(
        "/queues",
        response_model=list[DestinationQueue],
        summary="The forwarding queue of each destination: queued, sending, sent, failed",
    )
    async def list_queues(context: Context) -> list[DestinationQueue]:
        return await forwarding_queues(context.pool)

    @router.post(
        "", response_model=RoutingRule, status_code=201, summary="Add a rule", responses=_WRITE_ERRORS
    )
    async def add_rule(context: Context, rule: RoutingRuleCreate) -> RoutingRule:
        await _check_destinations(context, rule)
        try:
            return await RoutingRuleRepository(context.pool).add(rule)
        except RuleExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    @router.get("/{rule_id}", response_model=RoutingRule, summary="One rule", responses=_NOT_FOUND)
    async def get_rule(context: Context, rule_id: RuleId) -> RoutingRule:
        rule = await RoutingRuleRepository(context.pool).get(rule_id)
        if rule is None:
            raise HTTPException(status_code=404, detail=f"no routing rule {rule_id}")
        return rule

    @router.put(
        "/{rule_id}",
        response_model=RoutingRule,
        summary="Replace a rule",
        responses={**_NOT_FOUND, **_WRITE_ERRORS},
    )
    async def replace_rule(context: Context, rule_id: RuleId, rule: RoutingRuleCreate) -> RoutingRule:
        await _check_destinations(context, rule)
        try:
            replaced = await RoutingRuleRepository(context.pool).replace(rule_id, rule)
        except RuleExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        if replaced is None:
            raise HTTPException(status_code=404, detail=f"no routing rule {rule_id}")
        return replaced

    @router.delete("/{rule_id}", status_code=204, summary="Remove a rule", responses=_NOT_FOUND)
    async def remove_rule(context: Context, rule_id: RuleId) -> Response:
        if not await RoutingRuleRepository(context.pool).remove(rule_id):
            raise HTTPException(status_code=404, detail=f"no routing rule {rule_id}")
        return Response(status_code=204)

    return router
