"""The connector's HTTP routes beside health and metrics: the callback where
asynchronous inference services deliver their results.

``POST /v1/ai/jobs/{job_id}/results`` with ``Authorization: Bearer
<callback token of the request>`` and either the results as
``multipart/related; type="application/dicom"`` or ``{"error": "…"}`` as
JSON.  Any replica may receive it: the request is found in PostgreSQL.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ai_connector.endpoint import Outcome, OutcomeKind
from ai_connector.request_store import RequestStore
from ai_connector.results import InvalidResultError, parse_results
from ai_connector.worker import AiWorker, Attempt

__all__ = ["add_callback_route"]


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def add_callback_route(app: FastAPI, store: RequestStore, worker: AiWorker, max_bytes: int) -> None:
    @app.post("/v1/ai/jobs/{job_id}/results")
    async def results(job_id: int, request: Request) -> JSONResponse:
        waiting = await store.waiting_for_callback(job_id)
        if waiting is None:
            return _error(404, f"no AI job {job_id} waiting for results")
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not waiting.callback_token or not secrets.compare_digest(presented, waiting.callback_token):
            return _error(401, "wrong or missing callback token")
        body = await request.body()
        if len(body) > max_bytes:
            return _error(413, f"larger than {max_bytes} bytes")
        attempt = Attempt(
            waiting.id,
            waiting.attempts,
            waiting.max_attempts,
            waiting.rule_name,
            waiting.endpoint_url,
            waiting.study_instance_uid,
        )
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                report: dict[str, Any] = await request.json()
                reason = str(report.get("error") or "the inference service reported a failure")
            except (ValueError, ValidationError, AttributeError):
                reason = "the inference service reported a failure"
            await worker.settle(attempt, Outcome(OutcomeKind.RETRY, reason))
            return JSONResponse({"job_id": job_id, "state": "failure recorded"})
        try:
            parts = parse_results(content_type, body)
        except InvalidResultError as exc:
            await worker.settle(attempt, Outcome(OutcomeKind.FAIL, str(exc)))
            return _error(422, str(exc))
        try:
            stored = await worker.settle(
                attempt, Outcome(OutcomeKind.RESULTS, contents=[part.content for part in parts])
            )
        except InvalidResultError as exc:
            return _error(422, str(exc))
        return JSONResponse({"job_id": job_id, "stored": stored})
