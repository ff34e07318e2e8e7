"""(being built) — routes are added by the issue-4 work."""

from __future__ import annotations

from fastapi import APIRouter


def create_router() -> APIRouter:
    return APIRouter()
