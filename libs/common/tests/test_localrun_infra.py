"""Throwaway PostgreSQL/RabbitMQ, the ``pacs`` command and the local runner,
all against real servers and processes.

The fault tests of the e2e suite rely on ThrowawayPostgres/ThrowawayRabbitMQ
to stop and restart servers under a running system, so these tests check
exactly that: a real client connects, the server restarts and the client
connects again, and after ``stop()`` the port is closed and every process of
the server is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from pacs_common.localrun.infra import (
    LOCALHOST,
    ThrowawayPostgres,
    ThrowawayRabbitMQ,
    drop_database,
    pid_alive,
    postgres_reachable,
    process_tree,
    rabbitmq_reachable,
    redact_url,
    run_sync,
    tcp_port_open,
)

SHARED_PG = os.environ.get("PACS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARED_AMQP = os.environ.get("PACS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _assert_gone(pids: list[int], port: int) -> None:
    assert pids, "the server had no processes to check"
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert not tcp_port_open(LOCALHOST, port)


async def _select_one(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


async def _amqp_round_trip(url: str) -> bytes:
    """Connect, publish to a temporary queue, get the message back."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
        message = await queue.get(timeout=5, fail=True)
        assert message is not None
        await message.ack()
        return message.body
    finally:
        await connection.close()


# -- throwaway servers ------------------------------------------------------------


async def test_throwaway_postgres_start_restart_stop(tmp_path: Path) -> None:
    server = ThrowawayPostgres(tmp_path / "infra")
    try:
        server.start()
        assert server.is_running()
        assert await _select_one(server.url) == 1
        assert postgres_reachable(server.url)

        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE kept (value int); INSERT INTO kept VALUES (42)")
        await conn.close()
        first_pid = server.pid
        server.restart()
        assert server.pid != first_pid
        conn = await asyncpg.connect(server.url)
        assert await conn.fetchval("SELECT value FROM kept") == 42  # data survives a restart
        await conn.close()

        assert server.pid is not None
        pids = process_tree(server.pid)
        server.stop()
        assert not server.is_running()
        _assert_gone(pids, server.port)
        assert not postgres_reachable(server.url, timeout=1)
        server.stop()  # stopping a stopped server is a no-op
    finally:
        server.remove()
    assert not (tmp_path / "infra" / "postgres").exists()
    assert not server.root.exists()


async def test_throwaway_rabbitmq_start_restart_stop(tmp_path: Path) -> None:
    server = ThrowawayRabbitMQ(tmp_path / "infra")
    try:
        server.start()
        assert server.is_running()
        assert await _amqp_round_trip(server.url) == b"ping"
        assert rabbitmq_reachable(server.url)

        first_pid = server.pid
        server.restart()
        assert server.pid != first_pid
        assert await _amqp_round_trip(server.url) == b"ping"

        assert server.pid is not None
        pids = process_tree(server.pid)
        server.stop()
        assert not server.is_running()
        _assert_gone(pids, server.port)
        assert not rabbitmq_reachable(server.url, timeout=1)
    finally:
        server.remove()
    assert not server.root.exists()


def test_rabbitmq_ports_leave_room_for_the_cli(tmp_path: Path) -> None:
    server = ThrowawayRabbitMQ(tmp_path)
    assert server.dist_port == server.port + 10
    # rabbitmqctl binds dist+10000..+10010; the AMQP port must not be in there.
    assert not server.dist_port + 10_000 <= server.port <= server.dist_port + 10_010
    assert server.dist_port + 10_010 < 65_536
    server.remove()


def test_redact_url() -> None:
    assert redact_url("amqp://guest:secret@host:5672/") == "amqp://guest:***@host:5672/"
    assert redact_url("postgresql://postgres@127.0.0.1:5432/pacs") == (
        "postgresql://postgres@127.0.0.1:5432/pacs"
    )


# -- the pacs command ---------------------------------------------------------------


def _pacs_command() -> list[str]:
    """The installed ``pacs`` entry point of this environment (what ``uv run
    pacs`` runs, without uv re-syncing the environment under other tests)."""
    script = Path(sys.executable).parent / "pacs"
    if script.exists():
        return [str(script)]
    found = shutil.which("pacs")
    return [found] if found else [sys.executable, "-m", "pacs_common.cli.main"]


def _pacs(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_pacs_command(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def fresh_database_url() -> Iterator[str]:
    """A database name nobody uses on the shared PostgreSQL, dropped afterwards."""
    if not postgres_reachable(SHARED_PG):
        pytest.skip(f"no PostgreSQL at {SHARED_PG}")
    url = SHARED_PG.rsplit("/", 1)[0] + f"/pacs_cli_{uuid.uuid4().hex[:10]}"
    yield url
    drop_database(url)


@pytest.fixture
def pacs_env(fresh_database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PACS_DB_URL": fresh_database_url,
        "PACS_AMQP_URL": SHARED_AMQP,
        "PACS_AMQP_NAMESPACE": f"t{uuid.uuid4().hex[:12]}.",
    }


def test_pacs_migrate_and_status(tmp_path: Path, pacs_env: dict[str, str]) -> None:
    migrated = _pacs("migrate", env=pacs_env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert "revision" in migrated.stdout

    again = _pacs("migrate", env=pacs_env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already at revision" in again.stdout

    status = _pacs("status", "--json", env=pacs_env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["ok"] is True
    assert report["database"]["revision"]
    assert report["database"]["counts"] == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    assert report["broker"]["reachable"] is True
    # Looking declares nothing: a namespace no service used has no queues yet.
    assert report["broker"]["ingest_ready"] is None
    assert report["services"]["running"] is False

    text = _pacs("status", env=pacs_env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "0 instances" in text.stdout


def test_pacs_reports_unreachable_database_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PACS_DB_URL": f"postgresql://postgres@{LOCALHOST}:1/nothing"}
    result = _pacs("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pacs migrate: error: database unreachable")


def test_pacs_dlq_replay_needs_a_selection(tmp_path: Path) -> None:
    result = _pacs("dlq", "replay", env=dict(os.environ), cwd=tmp_path)
    assert result.returncode == 1
    assert "--all" in result.stderr
    assert "Traceback" not in result.stderr


# -- the local runner -----------------------------------------------------------------


def _runner_prerequisites() -> int:
    """Skip unless the gateway can run; how many workers to start (the worker
    service may not be installed yet)."""
    from pacs_common.localrun.runner import GATEWAY, WORKER

    if not GATEWAY.installed():
        pytest.skip("gateway service not available")
    if not rabbitmq_reachable(SHARED_AMQP):
        pytest.skip(f"no RabbitMQ at {SHARED_AMQP}")
    return 1 if WORKER.installed() else 0


def test_local_system_runs_and_stops(tmp_path: Path, fresh_database_url: str) -> None:
    from pacs_common.localrun.runner import LocalSystem, load_state
    from pacs_common.testing.broker import delete_namespace, unique_namespace

    workers = _runner_prerequisites()
    namespace = unique_namespace()
    system = LocalSystem(
        tmp_path,
        gateways=2,
        workers=workers,
        database_url=fresh_database_url,
        broker_url=SHARED_AMQP,
        namespace=namespace,
        gateway_port=0,
        http_port_base=0,
        stop_grace=20,
        out=None,
    )
    pids: list[int] = []
    try:
        system.start()
        assert system.revision
        assert system.env["PACS_AMQP_NAMESPACE"] == namespace
        assert system.env["PACS_STORAGE_HOT_PATH"] == str(tmp_path / "data" / "hot")
        assert tcp_port_open(LOCALHOST, system.gateway_port)
        state = load_state(tmp_path)
        assert state is not None
        names = [s["name"] for s in state["services"]]
        # Front doors first, then the background services, the worker, and
        # the query-service they all use last.
        assert names == [
            "gateway-0",
            "gateway-1",
            "dicomweb-0",
            "hsm-0",
            "prefetch-0",
            "ai-0",
            *(["worker-0"] if workers else []),
            "query-0",
        ]

        # What the fault tests do: SIGKILL a process, start it again.
        victim = system.workers[0] if workers else system.gateways[1]
        system.kill_service(victim.name, signal.SIGKILL)
        assert not victim.alive()
        system.start_service(victim.name)
        assert victim.alive()
        assert httpx.get(victim.ready_url).status_code == 200

        # No PACS_DB_URL/PACS_AMQP_*: `pacs status` finds them in the state file.
        hidden = ("PACS_DB_URL", "PACS_AMQP_URL", "PACS_AMQP_NAMESPACE")
        env = {k: v for k, v in os.environ.items() if k not in hidden}
        status = _pacs("status", "--json", env=env, cwd=tmp_path)
        report = json.loads(status.stdout)
        assert status.returncode == 0, status.stderr
        assert report["services"]["running"] is True
        assert all(item["ready"] for item in report["services"]["items"]), report
        assert report["database"]["counts"]["instances"] == 0
        assert report["broker"]["ingest_ready"] == 0

        pids = [s.pid for s in system.services if s.pid is not None]
    finally:
        system.stop()
        run_sync(lambda: delete_namespace(SHARED_AMQP, namespace))
    assert len(pids) == len(names)
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert load_state(tmp_path) is None
    assert not (tmp_path / ".pacs" / "run" / "state.json").exists()
