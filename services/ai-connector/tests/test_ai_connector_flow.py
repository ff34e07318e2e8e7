"""The ai-connector against real components: PostgreSQL, RabbitMQ, the
dicomweb-api (API tokens), the ingest worker, filesystem storage and the
reference inference service — a study.stable event for a CT study ends with
a SEG and an SR indexed in that study; retries, timeouts, refusals, the
callback, redelivered events and two replicas at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest_asyncio
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from ai_connector.main import ConnectorServices
from ai_connector.main import run as run_connector
from ai_connector.request_store import RequestStore
from ai_connector.settings import ConnectorSettings
from ai_reference.analysis import to_part10
from ai_reference.app import create_app as create_reference_app
from ai_reference.multipart import build_multipart
from ai_reference.phantom import CubePhantom
from ai_reference.settings import ReferenceSettings
from dicomweb_api.app import create_app as create_dicomweb_app
from dicomweb_api.context import ApiContext
from dicomweb_api.security import Role
from dicomweb_api.security.authentication import build_authenticator
from dicomweb_api.security.settings import AuthSettings
from dicomweb_api.security.tokens import TokenStore
from dicomweb_api.security.users import UserCreate, UserStore
from dicomweb_api.testing import Store, parse_multipart, serve
from ingest_worker.main import run as run_worker
from pacs_common.ai import AiRuleCreate, AiRuleRepository
from pacs_common.jobs import JobRepository
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import StudyStable
from pacs_common.settings import BrokerSettings, DatabaseSettings, WorkerSettings
from pacs_common.storage import ObjectStorage, StorageRegistry
from pacs_common.testing.storage_servers import free_port

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
WAIT_SECONDS = 60.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[str]:
    """``app`` on uvicorn (lifespan on) in this loop; its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", timeout_graceful_shutdown=1
    )
    server = _Server(config)
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


def counting(app: FastAPI) -> list[str]:
    """The paths of the requests ``app`` received (appended as they come)."""
    calls: list[str] = []

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        calls.append(request.url.path)
        return await call_next(request)

    return calls


async def eventually(what: str, check: Callable[[], Awaitable[bool]], within: float = WAIT_SECONDS) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.1)


@dataclasses.dataclass
class System:
    """The PACS parts the connector works with, running in this loop."""

    pool: asyncpg.Pool
    broker: Broker
    broker_settings: BrokerSettings
    database_settings: DatabaseSettings
    storage: ObjectStorage
    store: Store
    dicomweb_url: str
    token: str
    spool: Path
    exit_stack: contextlib.AsyncExitStack
    stops: dict[int, Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=dict)

    async def connector(self, **overrides: Any) -> ConnectorServices:
        values: dict[str, Any] = {
            "http_host": "127.0.0.1",
            "http_port": 0,
            "dicomweb_url": self.dicomweb_url,
            "dicomweb_token": self.token,
            "poll_interval_seconds": 0.2,
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 1.0,
            "lease_margin_seconds": 5.0,
            "spool_dir": self.spool,
        }
        values.update(overrides)
        services = ConnectorServices()
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_connector(
                ConnectorSettings(**values),
                self.database_settings,
                self.broker_settings,
                storage=self.storage,
                stop=stop,
                services=services,
                secrets={"AI_TEST_SECRET": "s3cret"},
            )
        )

        async def stop_connector() -> None:
            stop.set()
            await asyncio.wait_for(task, 30)

        self.exit_stack.push_async_callback(stop_connector)
        self.stops[id(services)] = stop_connector
        await eventually("connector consuming", lambda: _true(services.intake is not None), within=30)
        return services

    async def reference(self, settings: ReferenceSettings | None = None) -> tuple[str, list[str]]:
        app = create_reference_app(settings or ReferenceSettings())
        calls = counting(app)
        url = await self.exit_stack.enter_async_context(running(app))
        return f"{url}/v1/infer", calls

    async def rule(self, endpoint_url: str, **overrides: Any) -> int:
        values: dict[str, Any] = {"name": "bone", "modality": "CT", "endpoint_url": endpoint_url}
        values.update(overrides)
        return (await AiRuleRepository(self.pool).add(AiRuleCreate(**values))).id

    async def stable(self, study_instance_uid: str) -> None:
        await self.broker.publish_event(
            StudyStable(
                study_instance_uid=study_instance_uid,
                patient_id="AI-PHANTOM",
                modalities_in_study=["CT"],
                number_of_series=1,
                number_of_instances=10,
                last_received_at=datetime.now(UTC),
            )
        )

    async def requests(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """
            SELECT r.*, j.state AS job_state, j.error AS job_error, ru.name AS rule_name
            FROM ai_request r JOIN ai_rule ru ON ru.id = r.rule_id LEFT JOIN job j ON j.id = r.job_id
            ORDER BY r.id
            """
        )
        return [dict(row) for row in rows]

    async def settled(self, count: int = 1) -> list[dict[str, Any]]:
        async def done() -> bool:
            rows = await self.requests()
            return len(rows) >= count and all(r["state"] in ("succeeded", "failed") for r in rows)

        await eventually(f"{count} AI request(s) settled", done)
        return await self.requests()

    async def instances(self, study_instance_uid: str) -> dict[str, str]:
        rows = await self.pool.fetch(
            """
            SELECT i.sop_instance_uid, i.sop_class_uid FROM instance i
            JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
            WHERE st.study_instance_uid = $1
            """,
            study_instance_uid,
        )
        return {row["sop_instance_uid"]: row["sop_class_uid"] for row in rows}


async def _true(value: bool) -> bool:
    return value


@pytest_asyncio.fixture
async def system(  # noqa: PLR0917 - the fixtures it builds on
    api_context: ApiContext,
    db_pool: asyncpg.Pool,
    broker: Broker,
    broker_settings: BrokerSettings,
    database_settings: DatabaseSettings,
    hot_storage: ObjectStorage,
    store: Store,
    tmp_path: Path,
) -> AsyncIterator[System]:
    await UserStore(db_pool).create(UserCreate(username="ai-reader", roles=[Role.VIEWER]))
    _, token = await TokenStore(db_pool).create("ai-reader", "connector", None, None)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = api_context.settings.model_copy(update={"public_base_url": base_url})
    authenticator = await build_authenticator(db_pool, AuthSettings(anonymous_role=None, oidc_issuer=None))
    app = create_dicomweb_app(
        dataclasses.replace(api_context, settings=settings), authenticator, CollectorRegistry()
    )
    async with contextlib.AsyncExitStack() as stack:
        dicomweb_url = await stack.enter_async_context(serve(app, port))
        worker_stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(
                WorkerSettings(
                    http_host="127.0.0.1",
                    http_port=0,
                    batch_wait_ms=20,
                    study_stable_seconds=0.5,
                    stable_check_interval_seconds=0.2,
                ),
                database_settings,
                broker_settings,
                storage=StorageRegistry({"hot": hot_storage}),
                stop=worker_stop,
            )
        )

        async def stop_worker() -> None:
            worker_stop.set()
            await asyncio.wait_for(worker, 30)

        stack.push_async_callback(stop_worker)

        async def delete_ai_queue() -> None:
            channel = await broker.connection.channel()
            await channel.queue_delete(f"{broker_settings.namespace}ai")
            await channel.close()

        stack.push_async_callback(delete_ai_queue)
        yield System(
            db_pool,
            broker,
            broker_settings,
            database_settings,
            hot_storage,
            store,
            dicomweb_url,
            token,
            tmp_path / "ai-spool",
            stack,
        )


# -- the happy path ----------------------------------------------------------------


async def test_ct_study_gets_a_seg_and_an_sr_indexed_in_the_same_study(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, calls = await system.reference()
    await system.rule(endpoint, body_part_examined="chest", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    services = await system.connector()
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert (request["state"], request["attempts"], request["error"]) == ("succeeded", 1, None)
    assert request["job_state"] == "done"
    results = set(request["result_sop_instance_uids"])
    assert len(results) == 2

    async def indexed() -> bool:
        return results <= set(await system.instances(phantom.study_instance_uid))

    await eventually("results indexed", indexed)
    classes = await system.instances(phantom.study_instance_uid)
    assert sorted(classes[uid] for uid in results) == [SEG_CLASS, SR_CLASS]
    assert len(classes) == phantom.slices + 2
    assert calls == ["/v1/infer"]

    # Retrievable over WADO-RS like any instance.
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {system.token}"}) as http:
        response = await http.get(
            f"{system.dicomweb_url}/dicom-web/studies/{phantom.study_instance_uid}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
    assert response.status_code == 200
    retrieved = [
        dcmread(io.BytesIO(p.content))
        for p in parse_multipart(response.headers["content-type"], response.content)
    ]
    seg = next(ds for ds in retrieved if ds.SOPClassUID == SEG_CLASS)
    assert seg.StudyInstanceUID == phantom.study_instance_uid
    assert seg.PatientID == phantom.patient_id
    metrics = services.registry
    assert metrics.get_sample_value("pacs_ai_jobs_total", {"rule": "bone", "outcome": "succeeded"}) == 1
    assert metrics.get_sample_value("pacs_ai_results_stored_total") == 2


async def test_a_rule_for_mr_does_not_fire_on_a_ct_study(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, calls = await system.reference()
    await system.rule(endpoint, name="mr-only", modality="MR")
    await system.rule(endpoint, name="ct-abdomen", modality="CT", body_part_examined="ABDOMEN")
    await system.rule(endpoint, name="ct-disabled", modality="CT", enabled=False)
    services = await system.connector()
    await system.stable(phantom.study_instance_uid)

    async def handled() -> bool:
        return (services.registry.get_sample_value("pacs_ai_events_total", {"outcome": "handled"}) or 0) >= 1

    await eventually("event handled", handled)
    await asyncio.sleep(0.5)
    assert await system.requests() == []
    assert calls == []


# -- failures ----------------------------------------------------------------------


async def test_endpoint_down_is_retried_then_failed_with_the_reason(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    await system.rule(f"http://127.0.0.1:{free_port()}/v1/infer", max_attempts=3)
    services = await system.connector()
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert (request["state"], request["attempts"]) == ("failed", 3)
    assert "endpoint unreachable" in request["error"]
    assert "after 3 attempt(s)" in request["error"]
    assert request["job_state"] == "failed"
    assert "endpoint unreachable" in request["job_error"]
    metrics = services.registry
    assert metrics.get_sample_value("pacs_ai_jobs_total", {"rule": "bone", "outcome": "retried"}) == 2
    assert metrics.get_sample_value("pacs_ai_jobs_total", {"rule": "bone", "outcome": "failed"}) == 1


async def test_server_error_is_retried_and_the_status_recorded(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, calls = await system.reference()
    await system.rule(endpoint, max_attempts=2)
    # The reference service cannot fetch the study with a wrong token: 502.
    await system.connector(dicomweb_token="pacs_not-a-token")
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert (request["state"], request["attempts"]) == ("failed", 2)
    assert "HTTP 502" in request["error"] and "401" in request["error"]
    assert calls == ["/v1/infer", "/v1/infer"]


async def test_a_slow_endpoint_times_out(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    slow = FastAPI()

    @slow.post("/v1/infer")
    async def infer() -> Response:
        await asyncio.sleep(30)
        return Response(status_code=204)

    url = await system.exit_stack.enter_async_context(running(slow))
    await system.rule(f"{url}/v1/infer", timeout_seconds=0.5, max_attempts=1)
    await system.connector()
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert request["state"] == "failed"
    assert "no answer within the timeout of 0.5s" in request["error"]


async def test_results_of_another_study_are_refused(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    stranger = to_part10(CubePhantom(slices=1).images()[0])
    wrong = FastAPI()

    @wrong.post("/v1/infer")
    async def infer() -> Response:
        content_type, body = build_multipart([stranger])
        return Response(body, headers={"Content-Type": content_type})

    url = await system.exit_stack.enter_async_context(running(wrong))
    await system.rule(f"{url}/v1/infer", max_attempts=3)
    await system.connector()
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert (request["state"], request["attempts"]) == ("failed", 1)  # not retried
    assert "not to the source study" in request["error"]
    assert len(await system.instances(phantom.study_instance_uid)) == phantom.slices


async def test_endpoint_secret_and_headers_are_sent(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    seen: list[tuple[str | None, str | None, dict[str, Any]]] = []
    endpoint = FastAPI()

    @endpoint.post("/v1/infer")
    async def infer(request: Request) -> Response:
        seen.append(
            (request.headers.get("authorization"), request.headers.get("x-model"), await request.json())
        )
        return Response(status_code=204)

    url = await system.exit_stack.enter_async_context(running(endpoint))
    await system.rule(f"{url}/v1/infer", secret_ref="AI_TEST_SECRET", headers={"X-Model": "v2"})
    await system.connector()
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert request["state"] == "succeeded"
    [(authorization, model, body)] = seen
    assert (authorization, model) == ("Bearer s3cret", "v2")
    assert body["schema"] == "pacs.ai.request/1"
    assert body["job_id"] == str(request["job_id"])
    assert body["study_instance_uid"] == phantom.study_instance_uid
    assert body["auth"] == {"type": "bearer", "token": system.token}
    [series] = body["series"]
    assert series["series_instance_uid"] == phantom.series_instance_uid
    assert len(series["instances"]) == phantom.slices
    assert series["series_url"].startswith(f"{system.dicomweb_url}/dicom-web/studies/")
    assert body["callback"]["url"].endswith(f"/v1/ai/jobs/{request['job_id']}/results")


# -- the asynchronous form -----------------------------------------------------------


async def test_async_results_arrive_at_the_callback(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, _ = await system.reference(ReferenceSettings(asynchronous=True))
    await system.rule(endpoint)
    services = await system.connector()
    await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert (request["state"], request["attempts"]) == ("succeeded", 1)
    assert len(request["result_sop_instance_uids"]) == 2
    metrics = services.registry
    assert metrics.get_sample_value("pacs_ai_jobs_total", {"rule": "bone", "outcome": "accepted"}) == 1
    # The callback is closed once the request is settled, and needs the token.
    async with httpx.AsyncClient() as http:
        late = await http.post(
            f"http://127.0.0.1:{services.http_port}/v1/ai/jobs/{request['job_id']}/results",
            headers={"Authorization": "Bearer whatever"},
        )
    assert late.status_code == 404


async def test_callback_refuses_a_wrong_token(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    accepted = FastAPI()

    @accepted.post("/v1/infer")
    async def infer() -> Response:
        return Response(status_code=202)

    url = await system.exit_stack.enter_async_context(running(accepted))
    await system.rule(f"{url}/v1/infer")
    services = await system.connector()
    await system.stable(phantom.study_instance_uid)

    async def running_request() -> bool:
        rows = await system.requests()
        return bool(rows) and rows[0]["state"] == "running"

    await eventually("request waiting for the callback", running_request)
    [request] = await system.requests()
    callback = f"http://127.0.0.1:{services.http_port}/v1/ai/jobs/{request['job_id']}/results"
    async with httpx.AsyncClient() as http:
        refused = await http.post(callback, headers={"Authorization": "Bearer wrong"}, json={"error": "x"})
        assert refused.status_code == 401
        token = request["params"]["callback_token"]
        reported = await http.post(
            callback, headers={"Authorization": f"Bearer {token}"}, json={"error": "GPU on fire"}
        )
        assert reported.status_code == 200
    [request] = await system.requests()
    assert request["state"] == "queued"  # a failed attempt: retried later
    assert request["error"] == "GPU on fire"


# -- at most one run per (rule, study) ---------------------------------------------------


async def test_a_redelivered_event_does_not_run_twice(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, calls = await system.reference()
    await system.rule(endpoint)
    services = await system.connector()
    for _ in range(3):
        await system.stable(phantom.study_instance_uid)

    [request] = await system.settled()
    assert request["state"] == "succeeded"

    async def handled_all() -> bool:
        return (services.registry.get_sample_value("pacs_ai_events_total", {"outcome": "handled"}) or 0) >= 3

    await eventually("every event handled", handled_all)
    # And once more after it ran (the study changed: the results were added).
    await system.stable(phantom.study_instance_uid)
    await asyncio.sleep(1.0)
    assert len(await system.requests()) == 1
    assert calls == ["/v1/infer"]
    assert services.registry.get_sample_value("pacs_ai_requests_created_total", {"rule": "bone"}) == 1


async def test_two_connectors_run_each_study_once(system: System) -> None:
    phantoms = [CubePhantom(patient_id=f"AI-{n}") for n in range(4)]
    for phantom in phantoms:
        await system.store(phantom.images())
    endpoint, calls = await system.reference()
    await system.rule(endpoint, name="bone")
    await system.rule(endpoint, name="bone-chest", body_part_examined="CHEST")
    first = await system.connector(concurrency=2)
    second = await system.connector(concurrency=2)
    for phantom in phantoms:
        await system.stable(phantom.study_instance_uid)
        await system.stable(phantom.study_instance_uid)

    rows = await system.settled(count=2 * len(phantoms))
    assert len(rows) == 2 * len(phantoms)
    assert {(r["rule_name"], r["study_instance_uid"]) for r in rows} == {
        (rule, p.study_instance_uid) for rule in ("bone", "bone-chest") for p in phantoms
    }
    assert all((r["state"], r["attempts"]) == ("succeeded", 1) for r in rows)
    assert len(calls) == 2 * len(phantoms)

    def succeeded(services: ConnectorServices) -> float:
        return sum(
            services.registry.get_sample_value("pacs_ai_jobs_total", {"rule": rule, "outcome": "succeeded"})
            or 0
            for rule in ("bone", "bone-chest")
        )

    assert succeeded(first) + succeeded(second) == 2 * len(phantoms)


# -- leases, cancel and retry ----------------------------------------------------------


async def _request_for(system: System, phantom: CubePhantom, rule_id: int) -> int:
    rule = await AiRuleRepository(system.pool).get(rule_id)
    assert rule is not None
    request_id = await RequestStore(system.pool).create(
        rule, phantom.study_instance_uid, [phantom.series_instance_uid]
    )
    assert request_id is not None
    return request_id


async def test_a_request_of_a_dead_replica_is_taken_over_after_its_lease(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, calls = await system.reference()
    rule_id = await system.rule(endpoint)
    alive = await _request_for(system, phantom, rule_id)
    other = CubePhantom()
    await system.store(other.images())
    dead = await _request_for(system, other, rule_id)
    # Both claimed by replicas: one still within its lease, one whose lease ran out.
    await system.pool.execute(
        "UPDATE ai_request SET state = 'running', attempts = 1, lease_expires_at = now() + interval '1 hour' "
        "WHERE id = $1",
        alive,
    )
    await system.pool.execute(
        "UPDATE ai_request SET state = 'running', attempts = 1, lease_expires_at = now() - interval '1 second' "
        "WHERE id = $1",
        dead,
    )
    await system.connector()

    async def taken_over() -> bool:
        rows = {r["id"]: r for r in await system.requests()}
        return bool(rows[dead]["state"] == "succeeded")

    await eventually("the expired request run again", taken_over)
    await asyncio.sleep(0.5)
    rows = {r["id"]: r for r in await system.requests()}
    assert (rows[dead]["attempts"], rows[dead]["job_state"]) == (2, "done")
    assert (rows[alive]["state"], rows[alive]["attempts"]) == ("running", 1)  # not run twice
    assert calls == ["/v1/infer"]


async def test_cancelled_job_stops_the_request_and_retry_runs_it_again(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    endpoint, calls = await system.reference()
    request_id = await _request_for(system, phantom, await system.rule(endpoint))
    [request] = await system.requests()
    jobs = JobRepository(system.pool)
    await jobs.cancel(request["job_id"])
    await system.connector()

    [request] = await system.settled()
    assert (request["state"], request["error"]) == ("failed", "cancelled by an administrator")
    assert request["job_state"] == "cancelled"
    assert calls == []

    await jobs.retry(request["job_id"])  # an administrator puts it back

    async def succeeded() -> bool:
        return bool((await system.requests())[0]["state"] == "succeeded")

    await eventually("the retried request ran", succeeded)
    [request] = await system.requests()
    assert (request["id"], request["attempts"], request["job_state"]) == (request_id, 1, "done")
    assert len(request["result_sop_instance_uids"]) == 2
    assert calls == ["/v1/infer"]


async def test_stopping_hands_running_requests_back(system: System) -> None:
    phantom = CubePhantom()
    await system.store(phantom.images())
    slow = FastAPI()

    @slow.post("/v1/infer")
    async def infer() -> Response:
        await asyncio.sleep(30)
        return Response(status_code=204)

    url = await system.exit_stack.enter_async_context(running(slow))
    await system.rule(f"{url}/v1/infer", timeout_seconds=60)
    services = await system.connector(shutdown_grace_seconds=0.2)
    await system.stable(phantom.study_instance_uid)

    async def running_request() -> bool:
        rows = await system.requests()
        return bool(rows) and rows[0]["state"] == "running"

    await eventually("the request running", running_request)
    await system.stops[id(services)]()
    [request] = await system.requests()
    # Not failed, not stuck behind a lease: queued for any replica, attempt not counted.
    assert (request["state"], request["attempts"], request["lease_expires_at"]) == ("queued", 0, None)
