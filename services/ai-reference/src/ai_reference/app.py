"""The HTTP face of the reference service (FastAPI).

``POST /v1/infer`` takes the connector's request (CONTRACT.md) and answers
``200 multipart/related; type="application/dicom"`` with the results, or —
with ``asynchronous`` set and a callback in the request — ``202`` at once,
posting the results (or a JSON error) to the callback URL when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from ai_reference.analysis import AnalysisConfig
from ai_reference.contract import Callback, InferenceRequest
from ai_reference.multipart import build_multipart
from ai_reference.service import InferenceError, run_inference
from ai_reference.settings import ReferenceSettings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


@dataclass
class _State:
    client: httpx.AsyncClient | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)


def create_app(settings: ReferenceSettings) -> FastAPI:
    state = _State()
    config = AnalysisConfig(threshold_hu=settings.threshold_hu, segment_label=settings.segment_label)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.fetch_timeout_seconds) as client:
            state.client = client
            try:
                yield
            finally:
                for task in state.background:
                    task.cancel()
                await asyncio.gather(*state.background, return_exceptions=True)
                state.client = None

    app = FastAPI(title="PACS reference inference service", lifespan=lifespan)

    def http() -> httpx.AsyncClient:
        if state.client is None:
            raise RuntimeError("the service is not started")
        return state.client

    async def deliver(request: InferenceRequest, callback: Callback) -> None:
        """Run the request, then POST the results (or the error) to the callback."""
        try:
            results = await run_inference(request, http(), config, max_images=settings.max_images_per_series)
        except InferenceError as exc:
            content_type, body = "application/json", json.dumps({"error": str(exc)}).encode()
        except Exception as exc:
            logger.exception("job %s failed", request.job_id)
            content_type, body = (
                "application/json",
                json.dumps({"error": f"internal error: {exc!r}"}).encode(),
            )
        else:
            content_type, body = build_multipart(results)
        headers = {"Authorization": f"Bearer {callback.token}", "Content-Type": content_type}
        try:
            response = await http().post(callback.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            # The connector sends the request again once its wait for us runs out.
            logger.warning("job %s: callback %s unreachable: %r", request.job_id, callback.url, exc)
            return
        logger.info("job %s: callback answered %d", request.job_id, response.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/infer", summary="Analyse the CT series of a study")
    async def infer(body: InferenceRequest) -> Response:
        if settings.asynchronous and body.callback is not None:
            task = asyncio.create_task(deliver(body, body.callback), name=f"job-{body.job_id}")
            state.background.add(task)
            task.add_done_callback(state.background.discard)
            return JSONResponse({"job_id": body.job_id, "status": "accepted"}, status_code=202)
        try:
            results = await run_inference(body, http(), config, max_images=settings.max_images_per_series)
        except InferenceError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        content_type, payload = build_multipart(results)
        return Response(payload, media_type=None, headers={"Content-Type": content_type})

    return app
