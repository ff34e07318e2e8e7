"""The management REST API (mounted under ``/api/v1``): one router per
resource, each route declaring the permission it needs."""

from __future__ import annotations

from fastapi import APIRouter

from dicomweb_api.api import (
    ai,
    archive,
    clinical,
    deletion,
    hsm,
    jobs,
    key_images,
    locks,
    media,
    nodes,
    prefetch,
    routing_rules,
    sync,
    system,
    tasks,
    worklist,
)
from dicomweb_api.api.deidentify import create_router as create_deidentify_router
from dicomweb_api.api.signatures import create_router as create_signatures_router


def create_router() -> APIRouter:
    router = APIRouter()
    for module in (
        system,
        archive,
        deletion,
        nodes,
        worklist,
        locks,
        clinical,
        key_images,
        jobs,
        routing_rules,
        hsm,
        prefetch,
        tasks,
        ai,
        media,
        sync,
    ):
        router.include_router(module.create_router())
    router.include_router(create_deidentify_router())
    router.include_router(create_signatures_router())
    return router
