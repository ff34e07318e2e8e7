"""The ingest worker end to end, in-process: real RabbitMQ, real PostgreSQL,
a filesystem hot tier.  Messages are published the way the gateway does;
the tests watch the index, the events and the dead-letter queue."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest_asyncio
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from sqlalchemy.engine import make_url

from ingest_worker.main import WorkerServices, run
from pacs_common.messaging import Broker, IngestMessage, IngestSource, StorageLocation, list_dead_letters
from pacs_common.settings import BrokerSettings, DatabaseSettings, DuplicatePolicy, WorkerSettings
from pacs_common.storage import StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.testing.broker import TcpProxy

FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "JPEG2000.dcm",
    "dicomdirtests/98892001/CT2N/6293",
    "dicomdirtests/98892001/CT2N/6924",
    "dicomdirtests/98892001/CT5N/2062",
    "dicomdirtests/98892001/CT5N/2392",
]


def _data(name: str) -> bytes:
    return (Path(DATA_ROOT) / "test_files" / name).read_bytes()


@dataclass
class Harness:
    hot: FilesystemStorage
    broker: Broker
    pool: asyncpg.Pool
    events: list[dict[str, Any]]

    def store(self, key: str, data: bytes) -> StorageLocation:
        stored = self.hot.put(key, io.BytesIO(data))
        return StorageLocation(
            tier="hot", backend="filesystem", key=key, size=stored.size, sha256=stored.sha256
        )

    async def publish_file(self, name: str, **overrides: Any) -> IngestMessage:
        data = _data(name)
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        fields: dict[str, Any] = {
            "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "study_instance_uid": str(ds.StudyInstanceUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
            "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
            "location": self.store(overrides.pop("key", key), overrides.pop("data", data)),
            "source": IngestSource(protocol="dimse", calling_ae_title="MODALITY", called_ae_title="PACS"),
        }
        fields.update(overrides)
        message = IngestMessage(**fields)
        await self.broker.publish_ingest(message)
        return message

    async def count(self, sql: str, *args: Any) -> int:
        return int(await self.pool.fetchval(sql, *args))

    async def wait_for(self, what: str, check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    def stored_events(self, outcome: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["schema"] == "instance.stored/1" and (outcome is None or e["outcome"] == outcome)
        ]

    def stable_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["schema"] == "study.stable/1"]


def worker_settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "http_host": "127.0.0.1",
        "http_port": 0,
        "batch_size": 20,
        "batch_wait_ms": 50,
        "prefetch": 40,
        "study_stable_seconds": 0.5,
        "stable_check_interval_seconds": 0.2,
        "duplicate_policy": DuplicatePolicy.KEEP_FIRST,
    }
    values.update(overrides)
    return WorkerSettings(**values)


@pytest_asyncio.fixture(loop_scope="session")
async def harness(tmp_path: Path, broker: Broker, db_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    events: list[dict[str, Any]] = []
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(broker.topology.events_exchange, "#")

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        events.append(json.loads(message.body))
        await message.ack()

    await queue.consume(on_event)
    try:
        yield Harness(FilesystemStorage(tmp_path / "hot", fsync=False), broker, db_pool, events)
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def running_worker(
    harness: Harness,
    broker_settings: BrokerSettings,
    database_settings: DatabaseSettings,
    settings: WorkerSettings | None = None,
) -> AsyncIterator[WorkerServices]:
    stop = asyncio.Event()
    services = WorkerServices()
    task = asyncio.create_task(
        run(
            settings or worker_settings(),
            database_settings,
            broker_settings,
            storage=StorageRegistry({"hot": harness.hot}),
            stop=stop,
            services=services,
        )
    )
    try:
        yield services
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# -- the happy path --------------------------------------------------------------


async def test_indexes_instances_and_publishes_events(
    harness: Harness, broker_settings: BrokerSettings, database_settings: DatabaseSettings
) -> None:
    messages = [await harness.publish_file(name) for name in FILES]
    async with running_worker(harness, broker_settings, database_settings) as services:
        await harness.wait_for(
            "all instances indexed",
            lambda: _equals(harness.count("SELECT count(*) FROM instance"), len(FILES)),
        )
        await harness.wait_for(
            "instance.stored events", lambda: _true(len(harness.stored_events()) == len(FILES))
        )
        studies = {m.study_instance_uid for m in messages}
        await harness.wait_for(
            "study.stable events", lambda: _true(len(harness.stable_events()) == len(studies))
        )
        assert services.pool is not None

    for message in messages:
        row = await harness.pool.fetchrow(
            """
            SELECT i.sop_class_uid, se.series_instance_uid, st.study_instance_uid, l.key, l.sha256, i.source_ae_title
            FROM instance i JOIN series se ON se.pk = i.series_fk JOIN study st ON st.pk = se.study_fk
            JOIN instance_location l ON l.instance_fk = i.pk WHERE i.sop_instance_uid = $1
            """,
            message.sop_instance_uid,
        )
        assert row is not None
        assert (row["study_instance_uid"], row["series_instance_uid"]) == (
            message.study_instance_uid,
            message.series_instance_uid,
        )
        assert (row["key"], row["sha256"]) == (message.location.key, message.location.sha256)
        assert row["source_ae_title"] == "MODALITY"

    stored = {e["sop_instance_uid"]: e for e in harness.stored_events()}
    assert set(stored) == {m.sop_instance_uid for m in messages}
    ct = stored[messages[0].sop_instance_uid]
    assert (ct["outcome"], ct["modality"], ct["patient_id"]) == ("created", "CT", "1CT1")
    assert ct["location"]["key"] == messages[0].location.key

    # The four instances of one study are counted on it and announced once.
    study = await harness.pool.fetchrow(
        "SELECT * FROM study WHERE study_instance_uid = $1", messages[4].study_instance_uid
    )
    assert study is not None
    assert study["number_of_study_related_instances"] == 4
    announced = [
        e for e in harness.stable_events() if e["study_instance_uid"] == messages[4].study_instance_uid
    ]
    assert len(announced) == 1
    assert announced[0]["number_of_instances"] == 4
    assert announced[0]["number_of_series"] == 2


async def test_redelivery_and_duplicates(
    harness: Harness, broker_settings: BrokerSettings, database_settings: DatabaseSettings
) -> None:
    first = await harness.publish_file("CT_small.dcm")
    await harness.broker.publish_ingest(first)  # delivered twice
    # Same SOP Instance UID, other content (a different object under its own key).
    original = _data("CT_small.dcm")
    other = original.replace(b"CompressedSamples^CT1", b"CompressedSamples^XX1")
    await harness.publish_file("CT_small.dcm", key=first.location.key + ".other", data=other)
    async with running_worker(harness, broker_settings, database_settings):
        await harness.wait_for("three events", lambda: _true(len(harness.stored_events()) == 3))
    assert sorted(e["outcome"] for e in harness.stored_events()) == ["created", "kept-first", "unchanged"]
    assert await harness.count("SELECT count(*) FROM instance") == 1
    assert await harness.count("SELECT count(*) FROM instance_superseded WHERE decision = 'kept-first'") == 1
    name = await harness.pool.fetchval("SELECT patient_name FROM patient")
    assert name == "CompressedSamples^CT1"


# -- failures ----------------------------------------------------------------------


async def test_poison_messages_are_dead_lettered(
    harness: Harness, broker_settings: BrokerSettings, database_settings: DatabaseSettings
) -> None:
    good = await harness.publish_file("MR_small.dcm")
    # Not DICOM at all.
    await harness.publish_file("CT_small.dcm", key="garbage.dcm", data=b"this is not a DICOM object" * 10)
    # The object says another SOP Instance UID than the message.
    await harness.publish_file("rtplan.dcm", sop_instance_uid="1.2.3.4.5.6.7.8.9")
    # The object is not there (retried with backoff, then dead-lettered).
    missing = good.model_copy(
        update={
            "sop_instance_uid": "1.2.3.999",
            "location": good.location.model_copy(update={"key": "nowhere/missing.dcm"}),
        }
    )
    await harness.broker.publish_ingest(missing)
    # Stored in a tier this worker does not know.
    await harness.broker.publish_ingest(
        good.model_copy(update={"location": good.location.model_copy(update={"tier": "glacier"})})
    )

    async with running_worker(harness, broker_settings, database_settings) as services:

        async def four_dead() -> bool:
            return len(await list_dead_letters(harness.broker)) >= 4

        await harness.wait_for("four dead letters", four_dead)
        await harness.wait_for("the good one indexed", lambda: _true(len(harness.stored_events()) >= 1))
        async with httpx.AsyncClient() as client:
            port = services.http_port
            metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            ready = await client.get(f"http://127.0.0.1:{port}/health/ready")
    assert ready.status_code == 200

    reasons = sorted(letter.reason for letter in await list_dead_letters(harness.broker))
    assert len(reasons) == 4
    assert reasons[0].startswith("not-dicom: ")
    assert reasons[1].startswith("object-missing: ") and "nowhere/missing.dcm" in reasons[1]
    assert reasons[2].startswith("uid-mismatch: ") and "1.2.3.4.5.6.7.8.9" in reasons[2]
    assert reasons[3].startswith("unknown-tier: ") and "glacier" in reasons[3]
    assert [e["sop_instance_uid"] for e in harness.stored_events()] == [good.sop_instance_uid]
    assert await harness.count("SELECT count(*) FROM instance") == 1
    assert 'pacs_ingest_dead_lettered_total{kind="not-dicom"} 1.0' in metrics
    assert 'pacs_ingest_instances_total{outcome="created"} 1.0' in metrics


async def test_database_outage_loses_nothing(
    harness: Harness, broker_settings: BrokerSettings, database_settings: DatabaseSettings
) -> None:
    """The worker reaches PostgreSQL through a proxy that the test cuts (as
    a restart would): batches wait, nothing is acked, all lands once."""
    url = make_url(database_settings.url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    via_proxy = database_settings.model_copy(
        update={"url": url.set(port=proxy.port).render_as_string(hide_password=False)}
    )
    try:
        names = FILES[:4]
        async with running_worker(harness, broker_settings, via_proxy):
            await harness.publish_file(names[0])
            await harness.wait_for("first instance", lambda: _true(len(harness.stored_events()) == 1))
            proxy.cut()  # the database goes away
            for name in names[1:]:
                await harness.publish_file(name)
            await asyncio.sleep(1.5)  # batches fail and back off meanwhile
            assert len(harness.stored_events()) == 1
            proxy.start()  # and comes back
            await harness.wait_for(
                "all instances after the outage",
                lambda: _true(len(harness.stored_events()) == len(names)),
                40,
            )
    finally:
        proxy.cut()
    assert await harness.count("SELECT count(*) FROM instance") == len(names)
    assert sorted(e["outcome"] for e in harness.stored_events()) == ["created"] * len(names)
    assert await list_dead_letters(harness.broker) == []


async def test_graceful_stop_then_restart_indexes_everything_once(
    harness: Harness, broker_settings: BrokerSettings, database_settings: DatabaseSettings
) -> None:
    template = _data("CT_small.dcm")
    ds = dcmread(io.BytesIO(template))
    messages = []
    for n in range(120):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{n}"
        ds.InstanceNumber = n + 1
        buffer = io.BytesIO()
        ds.save_as(buffer)
        messages.append(
            await harness.publish_file(
                "CT_small.dcm",
                data=buffer.getvalue(),
                key=f"graceful/{n}.dcm",
                sop_instance_uid=ds.SOPInstanceUID,
            )
        )
    settings = worker_settings(batch_size=10, prefetch=10)
    async with running_worker(harness, broker_settings, database_settings, settings):
        await harness.wait_for("some indexed", lambda: _true(len(harness.stored_events()) >= 10))
    # Stopped mid-stream: what was indexed was acked (and announced), the rest waits.
    indexed = await harness.count("SELECT count(*) FROM instance")
    assert indexed >= 10
    async with running_worker(harness, broker_settings, database_settings):
        await harness.wait_for(
            "all indexed", lambda: _equals(harness.count("SELECT count(*) FROM instance"), len(messages))
        )
        await harness.wait_for(
            "all announced",
            lambda: _true(len({e["sop_instance_uid"] for e in harness.stored_events()}) == 120),
        )
    study = await harness.pool.fetchrow("SELECT * FROM study")
    assert study is not None and study["number_of_study_related_instances"] == 120
    assert await list_dead_letters(harness.broker) == []


# -- helpers -----------------------------------------------------------------------


async def _true(value: bool) -> bool:
    return value


async def _equals(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


# -- the process -------------------------------------------------------------------


async def test_process_stops_gracefully_on_sigterm(
    harness: Harness, broker_settings: BrokerSettings, database_settings: DatabaseSettings, tmp_path: Path
) -> None:
    """``python -m ingest_worker`` configured from PACS_* variables, as the
    local runner and Kubernetes start it; SIGTERM ends it cleanly (exit 0)."""
    messages = [await harness.publish_file(name) for name in FILES[:3]]
    env = {
        **os.environ,
        "PACS_DB_URL": database_settings.url,
        "PACS_AMQP_URL": broker_settings.url.get_secret_value(),
        "PACS_AMQP_NAMESPACE": broker_settings.namespace,
        "PACS_AMQP_RETRY_DELAYS_MS": json.dumps(broker_settings.retry_delays_ms),
        "PACS_STORAGE_HOT_PATH": str(harness.hot.root),
        "PACS_WORKER_HTTP_HOST": "127.0.0.1",
        "PACS_WORKER_HTTP_PORT": "0",
        "PACS_WORKER_BATCH_WAIT_MS": "20",
        "PACS_TELEMETRY_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest_worker", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await harness.wait_for("indexed by the process", lambda: _true(len(harness.stored_events()) == 3), 30)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()[-2000:]
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(line.get("message") == "ingest worker stopped" for line in lines)
    assert all(line.get("service") == "ingest-worker" for line in lines)
    assert {e["sop_instance_uid"] for e in harness.stored_events()} == {m.sop_instance_uid for m in messages}
