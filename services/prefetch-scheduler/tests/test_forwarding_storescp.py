"""Routing / auto-forward in-process against real peers: the forwarder
(``run_forwarder``) on a real RabbitMQ namespace and a real PostgreSQL,
instances indexed for real (``InstanceIndex``) and announced with the
events the ingest worker publishes, and DCMTK's ``storescp`` as the
destination, in bit-preserving mode so what it wrote is what we sent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from pacs_common.db.index import IndexItem, InstanceIndex
from pacs_common.dicom.metadata import parse_for_index
from pacs_common.jobs import JobKind, JobRepository, JobState
from pacs_common.messaging import Broker, IngestSource, InstanceStored, StorageLocation, StudyStable
from pacs_common.nodes import RemoteNodeCreate, RemoteNodeRepository
from pacs_common.routing import RoutingCondition, RoutingRuleCreate, RoutingRuleRepository, RoutingTrigger
from pacs_common.settings import BrokerSettings, DuplicatePolicy
from pacs_common.storage import ObjectExistsError, ObjectStorage, StorageRegistry
from pacs_common.storage.filesystem import FilesystemStorage
from pacs_common.storage.s3 import S3Storage
from pacs_common.testing.broker import free_port
from pacs_common.testing.storage_servers import MotoServer, unique_name
from prefetch_scheduler.forwarding.events import forwarding_queue_name
from prefetch_scheduler.forwarding.service import run_forwarder
from prefetch_scheduler.forwarding.settings import ForwardSettings

STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DESTINATION = "STORESCP"

pytestmark = pytest.mark.skipif(not Path(STORESCP).exists(), reason="DCMTK storescp not installed")


# -- instances ------------------------------------------------------------------------


def make_instance(
    study_uid: str,
    series_uid: str,
    *,
    modality: str = "CT",
    sop_class: str = CT_IMAGE,
    number: int = 1,
    body_part: str | None = None,
    study_description: str | None = None,
) -> bytes:
    """A small Part 10 image in Explicit VR Little Endian."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "FWD-1"
    ds.PatientName = "Forward^Test"
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.SeriesNumber = 1
    ds.StudyDate = "20261204"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if study_description is not None:
        ds.StudyDescription = study_description
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(64, dtype=np.uint16) * number).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def series_uid(study_uid: str, number: int) -> str:
    """A Series Instance UID derived from the study's (at most 64 characters)."""
    return f"{study_uid[:60]}.{number}"


def dataset_bytes(data: bytes) -> bytes:
    """The encoded dataset of a Part 10 object, without preamble and file meta."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) UL
    return data[144 + int.from_bytes(data[140:144], "little") :]


# -- the destination --------------------------------------------------------------------


class StoreScp:
    """DCMTK's storescp writing what it receives, bit-preserved, one file per C-STORE."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, *, accept_all: bool = True) -> None:
        """Listen; ``accept_all=False``: accept uncompressed transfer syntaxes only."""
        self.directory.mkdir(parents=True, exist_ok=True)
        syntaxes = ["+xa"] if accept_all else []
        self._proc = subprocess.Popen(
            [
                STORESCP,
                "+B",
                "+uf",
                *syntaxes,
                "-od",
                str(self.directory),
                "-aet",
                DESTINATION,
                str(self.port),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Ready once it answers a C-ECHO (a bare TCP probe would hold its one association slot).
        deadline = time.monotonic() + 10
        while not self._echo():
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)

    def _echo(self) -> bool:
        probe = subprocess.run(
            [ECHOSCU, "-to", "2", "-aec", DESTINATION, "127.0.0.1", str(self.port)],
            env=DCMTK_ENV,
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    def received(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def received_by_uid(self) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for path in self.received():
            data = path.read_bytes()
            try:
                uid = str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
            except (InvalidDicomError, EOFError, AttributeError):
                continue  # still being written

            out.setdefault(uid, []).append(data)
        return out


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    scp = StoreScp(tmp_path / "received", free_port())
    try:
        yield scp
    finally:
        scp.stop()


# -- the harness ------------------------------------------------------------------------


@dataclass
class Harness:
    pool: asyncpg.Pool
    broker: Broker
    broker_settings: BrokerSettings
    hot: FilesystemStorage
    registries: list[CollectorRegistry] = field(default_factory=list)
    # Tiers besides the hot one the forwarder reads from.
    other_tiers: dict[str, ObjectStorage] = field(default_factory=dict)

    async def ingest(self, data: bytes, *, calling_ae: str = "MODALITY") -> InstanceStored:
        """Store and index the object as the ingest worker does; the event it would publish."""
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        with contextlib.suppress(ObjectExistsError):  # the same object received again
            self.hot.put(key, io.BytesIO(data))
        location = StorageLocation(
            tier="hot", backend="filesystem", key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        parsed = parse_for_index(io.BytesIO(data), bulk_data_threshold=1024)
        item = IndexItem.build(parsed, location, datetime.now(UTC), calling_ae)
        [result] = await InstanceIndex(self.pool).index_batch(
            [item], duplicate_policy=DuplicatePolicy.KEEP_FIRST
        )
        return InstanceStored(
            sop_class_uid=result.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid,
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=result.series_instance_uid,
            patient_id=result.patient_id,
            modality=result.modality,
            outcome=result.outcome,
            location=result.location,
            source=IngestSource(protocol="dimse", calling_ae_title=calling_ae, called_ae_title="PACS"),
        )

    async def publish(self, *events: InstanceStored | StudyStable) -> None:
        for event in events:
            await self.broker.publish_event(event)

    async def add_node(self, port: int, ae_title: str = DESTINATION) -> None:
        await RemoteNodeRepository(self.pool).add(
            RemoteNodeCreate(ae_title=ae_title, host="127.0.0.1", port=port)
        )

    async def add_rule(
        self,
        name: str,
        condition: RoutingCondition,
        destinations: tuple[str, ...] = (DESTINATION,),
        **fields: Any,
    ) -> None:
        await RoutingRuleRepository(self.pool).add(
            RoutingRuleCreate(name=name, condition=condition, destinations=list(destinations), **fields)
        )

    async def forward_jobs(self) -> list[Any]:
        _, jobs = await JobRepository(self.pool).list(kinds=frozenset({JobKind.FORWARD}))
        return jobs

    async def items(self) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM forward_item ORDER BY id")

    async def consumers(self) -> int:
        """Consumers of the forwarding queue (0 while it does not exist)."""
        channel = await self.broker.connection.channel()
        try:
            queue = await channel.declare_queue(forwarding_queue_name(self.broker.topology), passive=True)
            return int(queue.declaration_result.consumer_count or 0)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def describe(self) -> str:
        """Jobs, items and handled events, for a failure message."""
        jobs = [
            (j.id, str(j.state), j.progress_done, j.progress_total, j.error)
            for j in await self.forward_jobs()
        ]
        items = [
            (i["id"], i["sop_instance_uid"][-6:], i["state"], i["attempts"], i["job_id"])
            for i in await self.items()
        ]
        handled = {t: self.handled(t) for t in ("instance.stored", "study.stable")}
        return f"jobs {jobs}, items {items}, events handled {handled}"

    def handled(self, trigger: str) -> float:
        """Events of ``trigger`` the forwarders handled (whatever came of them)."""
        return sum(
            self.metric("pacs_forward_events_total", trigger=trigger, outcome=outcome)
            for outcome in ("matched", "unmatched", "ignored", "dropped")
        )

    def metric(self, name: str, **labels: str) -> float:
        return sum(r.get_sample_value(name, labels) or 0.0 for r in self.registries)


async def wait_for(
    what: str,
    check: Callable[[], Awaitable[bool]],
    within: float = 30.0,
    describe: Callable[[], Awaitable[str]] | None = None,
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            state = "" if describe is None else f"; {await describe()}"
            raise AssertionError(f"timed out waiting for {what}{state}")
        await asyncio.sleep(0.05)


def settings(**overrides: Any) -> ForwardSettings:
    values: dict[str, Any] = {
        "ae_title": "PACS_FWD",
        "batch_size": 10,
        "poll_interval_seconds": 0.1,
        "retry_base_delay_seconds": 0.1,
        "retry_max_delay_seconds": 0.4,
        "max_attempts": 50,
        "connection_timeout_seconds": 2.0,
        "acse_timeout_seconds": 5.0,
        "dimse_timeout_seconds": 10.0,
        "network_timeout_seconds": 10.0,
        "lease_seconds": 60.0,
    }
    values.update(overrides)
    return ForwardSettings(**values)


@pytest.fixture
async def harness(
    tmp_path: Path, broker: Broker, broker_settings: BrokerSettings, db_pool: asyncpg.Pool
) -> AsyncIterator[Harness]:
    yield Harness(db_pool, broker, broker_settings, FilesystemStorage(tmp_path / "hot", fsync=False))
    # The forwarding queue is not part of pacs_common's Topology: delete it here.
    connection = await aio_pika.connect(broker_settings.url.get_secret_value())
    try:
        channel = await connection.channel()
        await channel.queue_delete(forwarding_queue_name(broker.topology))
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def running_forwarder(harness: Harness, forward_settings: ForwardSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    registry = CollectorRegistry()
    harness.registries.append(registry)
    task = asyncio.create_task(
        run_forwarder(
            harness.pool,
            harness.broker_settings,
            StorageRegistry({"hot": harness.hot, **harness.other_tiers}),
            registry,
            stop,
            settings=forward_settings,
        )
    )

    consumers_before = await harness.consumers()

    async def consuming() -> bool:
        if task.done():
            task.result()
        # A consumer on the queue: its bindings are in place, no event published now is lost.
        return await harness.consumers() > consumers_before

    try:
        await wait_for("the forwarder consuming events", consuming)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


# -- the tests --------------------------------------------------------------------------


async def test_instance_rule_forwards_ct_byte_identical_not_mr_and_not_twice(
    harness: Harness, storescp: StoreScp
) -> None:
    storescp.start()
    await harness.add_node(storescp.port)
    await harness.add_rule("CT to storescp", RoutingCondition(modality="CT"))
    study = generate_uid()
    ct = [make_instance(study, series_uid(study, 1), number=n) for n in range(1, 4)]
    mr = make_instance(study, series_uid(study, 2), modality="MR", sop_class=MR_IMAGE)
    events = [await harness.ingest(data) for data in [*ct, mr]]
    async with running_forwarder(harness, settings()):
        await harness.publish(*events)
        ct_uids = {e.sop_instance_uid for e in events[:3]}
        await wait_for("the CT instances", lambda: _true(set(storescp.received_by_uid()) == ct_uids))
        await wait_for("the forward jobs done", settled(harness))
        received = storescp.received_by_uid()
        assert set(received) == ct_uids
        for data, event in zip(ct, events, strict=False):
            [copy] = received[event.sop_instance_uid]
            assert dataset_bytes(copy) == dataset_bytes(data)
        # One job per rule, destination and study for the instances queued while it runs.
        jobs = await harness.forward_jobs()
        assert sum(j.progress_done for j in jobs) == sum(j.progress_total or 0 for j in jobs) == 3
        for job in jobs:
            assert (job.state, job.error) == (JobState.DONE, None)
            assert job.params["destination"] == DESTINATION
            assert job.params["study_instance_uid"] == study

        # The broker redelivers an event (same message): nothing goes out again.
        await harness.publish(events[0])
        # ...and an identical instance sent again by the modality (outcome "unchanged").
        await harness.publish(await harness.ingest(ct[1]))
        later = make_instance(study, series_uid(study, 1), number=9)
        later_event = await harness.ingest(later)
        await harness.publish(later_event)
        await wait_for("every event handled", lambda: _true(harness.handled("instance.stored") == 7))
        await wait_for(
            "the later instance", lambda: _true(later_event.sop_instance_uid in storescp.received_by_uid())
        )
        await wait_for("its job done", settled(harness))
    assert len(storescp.received()) == 4
    assert len(await harness.items()) == 4
    assert harness.metric("pacs_forward_instances_total", destination=DESTINATION, outcome="sent") == 4
    assert harness.metric("pacs_forward_enqueued_total", destination=DESTINATION) == 4


def settled(harness: Harness) -> Callable[[], Awaitable[bool]]:
    """Every forward job finished and no item queued or being sent."""

    async def check() -> bool:
        jobs = await harness.forward_jobs()
        live = await harness.pool.fetchval(
            "SELECT count(*) FROM forward_item WHERE state IN ('queued', 'sending')"
        )
        return bool(jobs) and live == 0 and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs)

    return check


async def _true(value: bool) -> bool:
    return value


async def test_study_stable_rule_forwards_the_whole_study(harness: Harness, storescp: StoreScp) -> None:
    storescp.start()
    await harness.add_node(storescp.port)
    await harness.add_rule(
        "stable chest studies",
        RoutingCondition(body_part_examined="CHEST", study_description="*thorax*"),
        trigger=RoutingTrigger.STUDY_STABLE,
    )
    chest, head = generate_uid(), generate_uid()
    chest_files = [
        make_instance(
            chest, series_uid(chest, 1), number=1, body_part="CHEST", study_description="CT Thorax"
        ),
        make_instance(
            chest, series_uid(chest, 1), number=2, body_part="CHEST", study_description="CT Thorax"
        ),
        # Another series of the study without the body part: still part of the study.
        make_instance(
            chest, series_uid(chest, 2), modality="MR", sop_class=MR_IMAGE, study_description="CT Thorax"
        ),
    ]
    head_files = [make_instance(head, series_uid(head, 1), body_part="HEAD", study_description="CT Thorax")]
    chest_events = [await harness.ingest(data) for data in chest_files]
    for data in head_files:
        await harness.ingest(data)

    def stable(study: str, count: int) -> StudyStable:
        return StudyStable(
            study_instance_uid=study,
            patient_id="FWD-1",
            modalities_in_study=["CT", "MR"],
            number_of_series=2,
            number_of_instances=count,
            last_received_at=datetime.now(UTC),
        )

    async with running_forwarder(harness, settings()):
        # instance.stored events do nothing: the only rule waits for the study.
        await harness.publish(*chest_events, stable(head, 1), stable(chest, 3))

        async def job_done() -> bool:
            jobs = await harness.forward_jobs()
            return len(jobs) == 1 and jobs[0].state == JobState.DONE

        await wait_for("the forward job done", job_done, describe=harness.describe)
        # Stable again (nothing new): nothing is sent twice.
        await harness.publish(stable(chest, 3))
        extra = make_instance(
            chest, series_uid(chest, 1), number=3, body_part="CHEST", study_description="CT Thorax"
        )
        extra_event = await harness.ingest(extra)
        await harness.publish(extra_event, stable(chest, 4))
        await wait_for(
            "every event handled",
            lambda: _true(harness.handled("instance.stored") == 4 and harness.handled("study.stable") == 4),
            describe=harness.describe,
        )
        await wait_for(
            "the new instance", lambda: _true(extra_event.sop_instance_uid in storescp.received_by_uid())
        )
        await wait_for("the forward jobs done", settled(harness))
    received = storescp.received_by_uid()
    assert set(received) == {e.sop_instance_uid for e in chest_events} | {extra_event.sop_instance_uid}
    assert all(len(copies) == 1 for copies in received.values())
    for data in chest_files:
        uid = str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid][0]) == dataset_bytes(data)


async def test_destination_down_retries_then_delivers(harness: Harness, storescp: StoreScp) -> None:
    await harness.add_node(storescp.port)  # nothing listens there yet
    await harness.add_rule("all", RoutingCondition())
    study = generate_uid()
    events = [await harness.ingest(make_instance(study, series_uid(study, 1), number=n)) for n in (1, 2)]
    async with running_forwarder(harness, settings()):
        await harness.publish(*events)

        async def retried() -> bool:
            items = await harness.items()
            return len(items) == 2 and all(i["attempts"] >= 2 and i["state"] != "failed" for i in items)

        await wait_for("failed attempts", retried)
        [job] = await harness.forward_jobs()
        assert job.state == JobState.RUNNING
        assert all("no association" in (i["last_error"] or "") for i in await harness.items())
        await wait_for(
            "the queue depth gauge",
            lambda: _true(harness.metric("pacs_forward_queue_depth", destination=DESTINATION) == 2),
        )
        storescp.start()

        async def job_done() -> bool:
            jobs = await harness.forward_jobs()
            return bool(jobs[0].state == JobState.DONE)

        await wait_for("the forward job done", job_done)
    assert set(storescp.received_by_uid()) == {e.sop_instance_uid for e in events}
    assert all(i["state"] == "done" and i["attempts"] >= 2 for i in await harness.items())
    assert harness.metric("pacs_forward_association_failures_total", destination=DESTINATION) >= 1
    assert harness.metric("pacs_forward_instances_total", destination=DESTINATION, outcome="retry") >= 2


async def test_a_destination_that_is_down_does_not_hold_up_another(
    harness: Harness, storescp: StoreScp
) -> None:
    storescp.start()
    await harness.add_node(storescp.port)
    await harness.add_node(free_port(), "NOWHERE")  # nothing listens there
    await harness.add_rule("both", RoutingCondition(), destinations=("NOWHERE", DESTINATION))
    study = generate_uid()
    events = [await harness.ingest(make_instance(study, series_uid(study, 1), number=n)) for n in range(1, 6)]
    async with running_forwarder(harness, settings(batch_size=2, concurrency_per_destination=1)):
        await harness.publish(*events)
        expected = {e.sop_instance_uid for e in events}
        await wait_for(
            "delivery to the live destination", lambda: _true(set(storescp.received_by_uid()) == expected)
        )
        retrying = await harness.pool.fetch(
            "SELECT state, last_error FROM forward_item WHERE destination = 'NOWHERE'"
        )
        assert len(retrying) == 5
        assert all(r["state"] in ("queued", "sending") for r in retrying)
        jobs = {j.params["destination"]: j for j in await harness.forward_jobs()}
        assert jobs["NOWHERE"].state == JobState.RUNNING
    assert harness.metric("pacs_forward_association_failures_total", destination="NOWHERE") >= 1
    assert harness.metric("pacs_forward_association_failures_total", destination=DESTINATION) == 0


async def test_gives_up_after_max_attempts_and_a_retried_job_delivers(
    harness: Harness, storescp: StoreScp
) -> None:
    await harness.add_node(storescp.port)  # nothing listens there
    await harness.add_rule("CT", RoutingCondition(modality="CT"))
    study = generate_uid()
    event = await harness.ingest(make_instance(study, series_uid(study, 1)))
    async with running_forwarder(harness, settings(max_attempts=3)):
        await harness.publish(event)

        async def job_failed() -> bool:
            jobs = await harness.forward_jobs()
            return len(jobs) == 1 and jobs[0].state == JobState.FAILED

        await wait_for("the forward job failed", job_failed)
        [job] = await harness.forward_jobs()
        assert job.error is not None
        assert job.error.startswith(f"1 of 1 instances not delivered to {DESTINATION}: no association")
        [item] = await harness.items()
        assert (item["state"], item["attempts"]) == ("failed", 3)
        assert harness.metric("pacs_forward_instances_total", destination=DESTINATION, outcome="failed") == 1

        # The destination is back; an operator retries the job (POST /jobs/{id}/retry).
        storescp.start()
        await JobRepository(harness.pool).retry(job.id)

        async def job_done() -> bool:
            return bool((await harness.forward_jobs())[0].state == JobState.DONE)

        await wait_for("the retried job done", job_done)
    assert set(storescp.received_by_uid()) == {event.sop_instance_uid}


async def test_two_forwarders_deliver_every_instance_exactly_once(
    harness: Harness, storescp: StoreScp
) -> None:
    storescp.start()
    await harness.add_node(storescp.port)
    await harness.add_rule("CT", RoutingCondition(modality="CT"))
    studies = [generate_uid() for _ in range(3)]
    events = [
        await harness.ingest(make_instance(study, series_uid(study, 1), number=n))
        for study in studies
        for n in range(1, 9)
    ]
    small_batches = settings(batch_size=3, concurrency_per_destination=2)
    async with running_forwarder(harness, small_batches), running_forwarder(harness, small_batches):
        await harness.publish(*events)
        # Every event twice, as after a redelivery, while the first copies are being sent.
        await harness.publish(*events)
        expected = {e.sop_instance_uid for e in events}

        async def all_handled() -> bool:
            handled = harness.handled("instance.stored")
            return handled == 2 * len(events) and set(storescp.received_by_uid()) == expected

        await wait_for("every event handled and every instance received", all_handled)
        await wait_for("no item live", settled(harness))
    assert len(storescp.received()) == len(events)
    assert set(storescp.received_by_uid()) == expected
    jobs = await harness.forward_jobs()
    assert all(j.state == JobState.DONE for j in jobs)
    assert sum(j.progress_total or 0 for j in jobs) == len(events)
    assert harness.metric("pacs_forward_instances_total", destination=DESTINATION, outcome="sent") == len(
        events
    )


async def test_converts_only_when_the_destination_refuses_the_stored_syntax(
    harness: Harness, storescp: StoreScp
) -> None:
    storescp.start(accept_all=False)
    await harness.add_node(storescp.port)
    await harness.add_rule("CT", RoutingCondition(modality="CT", sop_class_uid=CT_IMAGE))
    study = generate_uid()
    plain = make_instance(study, series_uid(study, 1), number=1)
    compressed_ds = dcmread(io.BytesIO(make_instance(study, series_uid(study, 1), number=2)))
    compressed_ds.compress(RLELossless)
    out = io.BytesIO()
    compressed_ds.save_as(out, enforce_file_format=True)
    compressed = out.getvalue()
    events = [await harness.ingest(data) for data in (plain, compressed)]
    async with running_forwarder(harness, settings()):
        await harness.publish(*events)
        await wait_for("every event handled", lambda: _true(harness.handled("instance.stored") == 2))
        await wait_for("the forward jobs done", settled(harness))
    received = storescp.received_by_uid()
    [plain_copy] = received[events[0].sop_instance_uid]
    assert dataset_bytes(plain_copy) == dataset_bytes(plain)  # accepted as stored: unchanged
    [converted] = received[events[1].sop_instance_uid]
    converted_ds = dcmread(io.BytesIO(converted))
    assert converted_ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(converted_ds.pixel_array, compressed_ds.pixel_array)
    assert harness.metric("pacs_forward_transcodes_total", outcome="converted") == 1


async def test_reads_each_instance_from_the_tier_the_index_names(
    harness: Harness, storescp: StoreScp, moto_server: MotoServer
) -> None:
    bucket = unique_name("fwd")
    moto_server.create_bucket(bucket)
    warm = S3Storage(bucket, client=moto_server.client())
    harness.other_tiers["warm"] = warm
    storescp.start()
    await harness.add_node(storescp.port)
    await harness.add_rule("CT", RoutingCondition(modality="CT"))
    study = generate_uid()
    files = [make_instance(study, series_uid(study, 1), number=n) for n in (1, 2)]
    events = [await harness.ingest(data) for data in files]
    # What the hsm-migrator does: the first instance now lives on the warm tier only.
    moved = events[0].location.key
    warm.put(moved, io.BytesIO(files[0]))
    await harness.pool.execute(
        "UPDATE instance_location SET tier = 'warm', backend = 's3' WHERE key = $1", moved
    )
    harness.hot.delete(moved)
    try:
        async with running_forwarder(harness, settings()):
            await harness.publish(*events)
            await wait_for("every event handled", lambda: _true(harness.handled("instance.stored") == 2))
            await wait_for("the forward jobs done", settled(harness))
    finally:
        warm.close()
    received = storescp.received_by_uid()
    for data, event in zip(files, events, strict=True):
        [copy] = received[event.sop_instance_uid]
        assert dataset_bytes(copy) == dataset_bytes(data)
