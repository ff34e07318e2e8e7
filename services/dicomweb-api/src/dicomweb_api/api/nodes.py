"""``/nodes``: the remote-node registry (AE registry) and a C-ECHO test.

The same registry ``pacs node`` edits and the gateway consults for C-MOVE
destinations (``pacs_common.nodes``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Response
from pydantic import ValidationError

from dicomweb_api.api.models import EchoRequest, EchoResult
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.security import Permission, require
from pacs_common.nodes import (
    NodeExistsError,
    NodeNotFoundError,
    RemoteNode,
    RemoteNodeCreate,
    RemoteNodeRepository,
    RemoteNodeUpdate,
    echo,
    tls_client_context,
)
from pacs_common.settings import GatewaySettings

__all__ = ["create_router"]

DEFAULT_CALLING_AE: Final = "PACS"

Context = Annotated[ApiContext, Depends(get_context)]
AeTitle = Annotated[str, Path(min_length=1, max_length=16, description="the node's AE title")]
_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {404: {"description": "no node with this AE title"}}


def _calling_ae_title(requested: str | None) -> str:
    """Ours in the association: as asked, else the gateway's (as ``pacs node echo``)."""
    if requested:
        return requested.strip(" ")
    try:
        return GatewaySettings().ae_title
    except ValidationError:
        return DEFAULT_CALLING_AE


async def _node(context: ApiContext, ae_title: str) -> RemoteNode:
    node = await RemoteNodeRepository(context.pool).get(ae_title)
    if node is None:
        raise HTTPException(status_code=404, detail=f"no node with AE title {ae_title!r}")
    return node


def create_router() -> APIRouter:
    router = APIRouter(prefix="/nodes", tags=["nodes"], dependencies=[Depends(require(Permission.ADMIN))])

    @router.get("", response_model=list[RemoteNode], summary="List registered nodes")
    async def list_nodes(context: Context) -> list[RemoteNode]:
        return await RemoteNodeRepository(context.pool).list()

    @router.post(
        "",
        response_model=RemoteNode,
        status_code=201,
        summary="Register a node",
        responses={409: {"description": "a node with this AE title exists"}},
    )
    async def add_node(context: Context, node: RemoteNodeCreate) -> RemoteNode:
        try:
            return await RemoteNodeRepository(context.pool).add(node)
        except NodeExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    @router.get("/{ae_title}", response_model=RemoteNode, summary="One node", responses=_NOT_FOUND)
    async def get_node(context: Context, ae_title: AeTitle) -> RemoteNode:
        return await _node(context, ae_title)

    @router.put(
        "/{ae_title}",
        response_model=RemoteNode,
        summary="Change a node (only the fields given change)",
        responses=_NOT_FOUND,
    )
    async def update_node(context: Context, ae_title: AeTitle, change: RemoteNodeUpdate) -> RemoteNode:
        try:
            return await RemoteNodeRepository(context.pool).update(ae_title, change)
        except NodeNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    @router.delete("/{ae_title}", status_code=204, summary="Unregister a node", responses=_NOT_FOUND)
    async def remove_node(context: Context, ae_title: AeTitle) -> Response:
        if not await RemoteNodeRepository(context.pool).remove(ae_title):
            raise HTTPException(status_code=404, detail=f"no node with AE title {ae_title!r}")
        return Response(status_code=204)

    @router.post(
        "/{ae_title}/echo",
        response_model=EchoResult,
        summary="C-ECHO the node (Verification); reports the outcome and the round trip",
        responses=_NOT_FOUND,
    )
    async def echo_node(
        context: Context,
        ae_title: AeTitle,
        options: Annotated[EchoRequest | None, Body()] = None,
    ) -> EchoResult:
        node = await _node(context, ae_title)
        options = options or EchoRequest()
        calling = await asyncio.to_thread(_calling_ae_title, options.calling_ae_title)
        ssl_context = tls_client_context() if node.tls else None
        started = time.perf_counter()
        try:
            success, message = await asyncio.to_thread(
                echo, node, calling_ae_title=calling, timeout=options.timeout_seconds, ssl_context=ssl_context
            )
        except (OSError, RuntimeError, ValueError) as exc:  # TLS handshake, bad address
            success, message = False, f"{type(exc).__name__}: {exc}"
        elapsed_ms = (time.perf_counter() - started) * 1000
        return EchoResult(
            ae_title=node.ae_title,
            host=node.host,
            port=node.port,
            calling_ae_title=calling,
            success=success,
            message=message,
            round_trip_ms=round(elapsed_ms, 3),
        )

    return router
