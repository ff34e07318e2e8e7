"""The background audit writer (for threads that must not wait: the DIMSE
gateway's association handlers): queued records reach PostgreSQL and a real
UDP syslog receiver; a full queue or an unreachable database drops records,
counted, without raising into the caller."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import asyncpg
import pytest

from pacs_common.audit import (
    AuditAction,
    AuditActor,
    AuditEventId,
    AuditObject,
    AuditOutcome,
    AuditRecord,
    AuditSettings,
    BackgroundAuditWriter,
)
from pacs_common.db.blocking import BlockingPool
from pacs_common.settings import DatabaseSettings

MODALITY = AuditActor(name="CT_ROOM_1", method="dimse", address="192.168.7.7")


def _record(study: str = "1.2.3.4") -> AuditRecord:
    return AuditRecord(
        event=AuditEventId.INSTANCES_TRANSFERRED,
        action=AuditAction.CREATE,
        outcome=AuditOutcome.SUCCESS,
        actor=MODALITY,
        objects=[AuditObject(type="study", id=study)],
        details={"operation": "C-STORE", "stored": 2},
    )


@pytest.fixture
def blocking_pool(database_settings: DatabaseSettings) -> Iterator[BlockingPool]:
    pool = BlockingPool(database_settings, application_name="test-audit-writer")
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def udp_server() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    try:
        yield server
    finally:
        server.close()


async def test_queued_records_reach_postgresql_and_syslog(
    db_pool: asyncpg.Pool, blocking_pool: BlockingPool, udp_server: socket.socket
) -> None:
    settings = AuditSettings(syslog_host="127.0.0.1", syslog_port=udp_server.getsockname()[1])
    writer = BackgroundAuditWriter(blocking_pool, settings)
    writer.start()
    try:
        assert writer.submit(_record("1.2.3.1")) and writer.submit(_record("1.2.3.2"))
        assert writer.flush(10)
        datagrams = [udp_server.recv(65535).decode() for _ in range(2)]
    finally:
        writer.stop()
    rows = await db_pool.fetch("SELECT * FROM audit_event ORDER BY pk")
    assert [list(r["study_uids"]) for r in rows] == [["1.2.3.1"], ["1.2.3.2"]]
    assert {(r["actor"], r["actor_method"], r["source_address"], r["action"]) for r in rows} == {
        ("CT_ROOM_1", "dimse", "192.168.7.7", "C")
    }
    assert all("IHE+RFC-3881" in d and "<AuditMessage>" in d for d in datagrams)
    assert 'UserID="CT_ROOM_1"' in datagrams[0] and 'ParticipantObjectID="1.2.3.1"' in datagrams[0]


async def test_a_full_queue_drops_and_counts(db_pool: asyncpg.Pool, blocking_pool: BlockingPool) -> None:
    dropped: list[str] = []
    writer = BackgroundAuditWriter(blocking_pool, AuditSettings(queue_size=2), on_drop=dropped.append)
    # Not started yet: nothing drains the queue.
    assert writer.submit(_record()) and writer.submit(_record())
    assert not writer.submit(_record())
    assert dropped == ["queue_full"]
    writer.start()
    writer.stop()  # what was queued is written before the thread ends
    assert await db_pool.fetchval("SELECT count(*) FROM audit_event") == 2


def test_an_unreachable_database_drops_and_counts(database_settings: DatabaseSettings) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_unused_port()}/nowhere"
    dead = database_settings.model_copy(update={"url": url, "pool_min_size": 0})
    pool = BlockingPool(dead, timeout_seconds=2)
    pool.start()  # min size 0: nothing connects yet
    dropped: list[str] = []
    writer = BackgroundAuditWriter(pool, AuditSettings(), on_drop=dropped.append, write_timeout_seconds=2)
    writer.start()
    try:
        caller = threading.current_thread()
        assert writer.submit(_record())  # returns at once, whatever the database does
        assert threading.current_thread() is caller
        assert writer.flush(10)
    finally:
        writer.stop()
        pool.stop()
    assert dropped == ["database"]


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
