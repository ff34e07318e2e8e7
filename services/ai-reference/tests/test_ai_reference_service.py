"""The reference service over HTTP against the real dicomweb-api: it fetches
the study over WADO-RS with the bearer token of the request, and answers
with a SEG and an SR of the same study (synchronously, or at the callback)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator, Generator
from typing import Any, cast

import asyncpg
import highdicom as hd
import httpx
import pytest_asyncio
import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from ai_reference.app import create_app as create_reference_app
from ai_reference.multipart import parse_multipart
from ai_reference.phantom import CubePhantom
from ai_reference.settings import ReferenceSettings
from dicomweb_api.app import create_app as create_dicomweb_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security import Role
from dicomweb_api.security.authentication import build_authenticator
from dicomweb_api.security.settings import AuthSettings
from dicomweb_api.security.tokens import TokenStore
from dicomweb_api.security.users import UserCreate, UserStore
from dicomweb_api.testing import Store, serve
from pacs_common.testing.storage_servers import free_port

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[str]:
    """``app`` on uvicorn (lifespan on) in this loop; its base URL."""
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclasses.dataclass
class Pacs:
    url: str  # the dicomweb-api root
    token: str  # an API token of a viewer


@pytest_asyncio.fixture
async def pacs(api_context: ApiContext, db_pool: asyncpg.Pool) -> AsyncIterator[Pacs]:
    """The dicomweb-api on uvicorn with its real authenticator (API tokens)."""
    await UserStore(db_pool).create(UserCreate(username="ai-reader", roles=[Role.VIEWER]))
    _, secret = await TokenStore(db_pool).create("ai-reader", "reference", None, None)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = api_context.settings.model_copy(update={"public_base_url": base_url})
    authenticator = await build_authenticator(db_pool, AuthSettings(anonymous_role=None, oidc_issuer=None))
    app = create_dicomweb_app(
        dataclasses.replace(api_context, settings=settings), authenticator, CollectorRegistry()
    )
    async with serve(app, port) as url:
        yield Pacs(url, secret)


def inference_request(pacs: Pacs, phantom: CubePhantom, *, token: str | None, **extra: Any) -> dict[str, Any]:
    study_url = f"{pacs.url}/dicom-web/studies/{phantom.study_instance_uid}"
    images = phantom.images(shuffle_seed=None)
    return {
        "schema": "pacs.ai.request/1",
        "job_id": "42",
        "rule": "bone",
        "study_instance_uid": phantom.study_instance_uid,
        "patient_id": phantom.patient_id,
        "series": [
            {
                "series_instance_uid": phantom.series_instance_uid,
                "modality": "CT",
                "body_part_examined": "CHEST",
                "series_url": f"{study_url}/series/{phantom.series_instance_uid}",
                "instances": [
                    {"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID)}
                    for ds in images
                ],
            }
        ],
        "dicomweb": {"base_url": f"{pacs.url}/dicom-web", "study_url": study_url},
        "auth": None if token is None else {"type": "bearer", "token": token},
        **extra,
    }


def volume_of(sr_bytes: bytes) -> float:
    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    group = cast(hd.sr.MeasurementReport, sr.content).get_volumetric_roi_measurement_groups()[0]
    return float(group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0].value)


async def test_sync_answer_is_a_seg_and_an_sr_of_the_study(pacs: Pacs, store: Store) -> None:
    phantom = CubePhantom()
    await store(phantom.images())
    async with running(create_reference_app(ReferenceSettings())) as url, httpx.AsyncClient() as http:
        response = await http.post(f"{url}/v1/infer", json=inference_request(pacs, phantom, token=pacs.token))
    assert response.status_code == 200, response.text
    parts = parse_multipart(response.headers["content-type"], response.content)
    datasets = [dcmread(io.BytesIO(p.content)) for p in parts]
    assert [str(ds.SOPClassUID) for ds in datasets] == [SEG_CLASS, SR_CLASS]
    assert {str(ds.StudyInstanceUID) for ds in datasets} == {phantom.study_instance_uid}
    assert volume_of(parts[1].content) == phantom.cube_voxels * phantom.voxel_mm3


async def test_without_credentials_the_fetch_fails_as_a_gateway_error(pacs: Pacs, store: Store) -> None:
    phantom = CubePhantom()
    await store(phantom.images())
    async with running(create_reference_app(ReferenceSettings())) as url, httpx.AsyncClient() as http:
        response = await http.post(f"{url}/v1/infer", json=inference_request(pacs, phantom, token=None))
        assert response.status_code == 502
        assert "401" in response.json()["error"]
        bad = await http.post(f"{url}/v1/infer", json=inference_request(pacs, phantom, token="pacs_wrong"))
        assert bad.status_code == 502


async def test_a_study_without_ct_is_refused(pacs: Pacs, store: Store) -> None:
    phantom = CubePhantom(modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    await store(phantom.images())
    request = inference_request(pacs, phantom, token=pacs.token)
    request["series"][0]["modality"] = "MR"
    async with running(create_reference_app(ReferenceSettings())) as url, httpx.AsyncClient() as http:
        response = await http.post(f"{url}/v1/infer", json=request)
    assert response.status_code == 422


async def test_async_mode_posts_the_results_to_the_callback(pacs: Pacs, store: Store) -> None:
    phantom = CubePhantom(cube_hu=2000.0)
    await store(phantom.images())
    received: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    callback = FastAPI()

    @callback.post("/v1/ai/jobs/{job_id}/results")
    async def results(job_id: str, request: Request) -> dict[str, str]:
        await received.put(
            (request.headers["authorization"], request.headers["content-type"], await request.body())
        )
        return {"ok": job_id}

    settings = ReferenceSettings(asynchronous=True, threshold_hu=1500)
    async with (
        running(callback) as callback_url,
        running(create_reference_app(settings)) as url,
        httpx.AsyncClient() as http,
    ):
        request = inference_request(
            pacs,
            phantom,
            token=pacs.token,
            callback={"url": f"{callback_url}/v1/ai/jobs/42/results", "token": "cb-secret"},
        )
        response = await http.post(f"{url}/v1/infer", json=request)
        assert response.status_code == 202
        authorization, content_type, body = await asyncio.wait_for(received.get(), 30)
    assert authorization == "Bearer cb-secret"
    parts = parse_multipart(content_type, body)
    assert len(parts) == 2
    assert volume_of(parts[1].content) == phantom.cube_voxels * phantom.voxel_mm3
