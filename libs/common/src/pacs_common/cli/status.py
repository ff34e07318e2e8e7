"""``pacs status``: is the archive healthy, and what does it hold?

One look at everything an operator asks first: schema revision, how much is
indexed, how much waits in the ingest queue or sits in the dead-letter queue,
and whether the locally running services (from ``pacs run``'s state file)
answer their readiness checks.  Each part is gathered independently, so a
broker that is down still leaves the database figures visible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from pacs_common.cli.common import (
    CliError,
    broker_settings,
    connect_database,
    database_settings,
    expected_errors,
    open_broker,
)
from pacs_common.localrun.infra import describe_error, pid_alive, redact_url, run_sync
from pacs_common.localrun.runner import LocalRunError, RunState, load_migrations, load_state
from pacs_common.settings import BrokerSettings, DatabaseSettings

# Entity → table names the schema might use (first existing one counts).
COUNTED_TABLES: dict[str, tuple[str, ...]] = {
    "patients": ("patient", "patients"),
    "studies": ("study", "studies"),
    "series": ("series",),
    "instances": ("instance", "instances"),
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status", help="schema revision, index counts, queue depths, service health"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    project_dir: Path = args.project_dir
    report: dict[str, Any] = {
        "database": database_status(database_settings(project_dir)),
        "broker": broker_status(broker_settings(project_dir)),
        "services": services_status(load_state(project_dir), project_dir),
    }
    problems = [
        f"{part}: {report[part]['error']}"
        for part in ("database", "broker", "services")
        if report[part].get("error")
    ]
    report["ok"] = not problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    if problems:
        raise CliError("; ".join(problems))
    return 0


def database_status(settings: DatabaseSettings) -> dict[str, Any]:
    status: dict[str, Any] = {
        "url": redact_url(settings.url),
        "reachable": False,
        "revision": None,
        "head_revision": None,
        "counts": None,
        "error": None,
    }
    try:
        status["counts"] = run_sync(lambda: _count_rows(settings))
        status["reachable"] = True
        _, current_revision = load_migrations()
        from pacs_common.db.migrate import head_revision

        status["revision"] = current_revision(settings)
        status["head_revision"] = head = head_revision()
        if status["revision"] is None:
            status["error"] = "no schema (run `pacs migrate`)"
        elif status["revision"] != head:
            status["error"] = f"schema at {status['revision']}, this code expects {head} (run `pacs migrate`)"
    except (CliError, LocalRunError) as exc:
        status["error"] = str(exc)
    except Exception as exc:
        if not isinstance(exc, expected_errors()):
            raise
        status["error"] = describe_error(exc)
    return status


async def _count_rows(settings: DatabaseSettings) -> dict[str, int | None]:
    """Exact row counts (None for a table the schema does not have)."""
    conn = await connect_database(settings)
    try:
        counts: dict[str, int | None] = {}
        for entity, candidates in COUNTED_TABLES.items():
            counts[entity] = None
            for table in candidates:
                if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                    counts[entity] = await conn.fetchval(f'SELECT count(*) FROM "{table}"')
                    break
        return counts
    finally:
        await conn.close()


def broker_status(settings: BrokerSettings) -> dict[str, Any]:
    from pacs_common.messaging.topology import Topology

    topology = Topology.from_settings(settings)
    status: dict[str, Any] = {
        "url": redact_url(settings.url.get_secret_value()),
        "namespace": settings.namespace,
        "reachable": False,
        "ingest_queue": topology.ingest_queue,
        "ingest_ready": None,
        "dead_letter_queue": topology.dead_letter_queue,
        "dead_letters": None,
        "error": None,
    }
    try:
        depths = run_sync(lambda: _queue_depths(settings))
    except CliError as exc:
        status["error"] = str(exc)
        return status
    status["reachable"] = True
    status["ingest_ready"], status["dead_letters"] = depths
    return status


async def _queue_depths(settings: BrokerSettings) -> tuple[int | None, int | None]:
    """Messages ready in the ingest queue and in the DLQ (None: not declared yet)."""
    async with open_broker(settings, declare=False) as broker:
        depths: list[int | None] = []
        for queue in (broker.topology.ingest_queue, broker.topology.dead_letter_queue):
            try:
                depths.append(await broker.queue_depth(queue))
            except LookupError:
                depths.append(None)
        return depths[0], depths[1]


def services_status(state: RunState | None, project_dir: Path) -> dict[str, Any]:
    if state is None:
        return {"running": False, "project_dir": str(project_dir), "items": [], "error": None}
    items: list[dict[str, Any]] = []
    with httpx.Client(timeout=3.0) as client:
        for service in state["services"]:
            pid = service["pid"]
            item: dict[str, Any] = {
                "name": service["name"],
                "pid": pid,
                "alive": pid is not None and pid_alive(pid),
                "ready": False,
                "checks": None,
                "health_url": service["health_url"],
                "metrics_url": service["metrics_url"],
                "log": service["log"],
            }
            if item["alive"]:
                try:
                    response = client.get(service["health_url"])
                    item["ready"] = response.status_code == 200
                    item["checks"] = response.json().get("checks")
                except (httpx.HTTPError, ValueError, AttributeError):
                    pass
            items.append(item)
    not_ready = [item["name"] for item in items if not item["ready"]]
    return {
        "running": True,
        "project_dir": str(project_dir),
        "runner_pid": state["runner_pid"],
        "started_at": state["started_at"],
        "dicom": state["dicom"],
        "items": items,
        "error": f"not ready: {', '.join(not_ready)}" if not_ready else None,
    }


def render(report: dict[str, Any]) -> str:
    """The report for humans."""
    db, broker, services = report["database"], report["broker"], report["services"]
    lines = [f"database   {db['url']}  revision {db['revision'] or '-'}"]
    if db["counts"] is not None:
        lines.append("index      " + ", ".join(f"{_n(v)} {k}" for k, v in db["counts"].items()))
    if db["error"]:
        lines.append(f"           ! {db['error']}")
    namespace = f"  namespace {broker['namespace']!r}" if broker["namespace"] else ""
    lines.append(f"broker     {broker['url']}{namespace}")
    if broker["reachable"] and broker["ingest_ready"] is None:
        lines.append("queues     not declared yet (no service has used this namespace)")
    elif broker["reachable"]:
        lines.append(
            f"queues     {broker['ingest_queue']}: {_n(broker['ingest_ready'])} waiting, "
            f"{broker['dead_letter_queue']}: {_n(broker['dead_letters'])} dead letters"
        )
    if broker["error"]:
        lines.append(f"           ! {broker['error']}")
    if not services["running"]:
        lines.append(f"services   not running (no `pacs run` in {services['project_dir']})")
        return "\n".join(lines)
    dicom = services["dicom"]
    lines.append(
        f"services   runner pid {services['runner_pid']} since {services['started_at']}; "
        f"DICOM AE {dicom['ae_title']} on port {dicom['port']}"
    )
    for item in services["items"]:
        if item["ready"]:
            health = "ready"
        elif item["alive"]:
            failing = [k for k, v in (item["checks"] or {}).items() if v != "ok"]
            health = "NOT READY" + (f" ({', '.join(failing)} failing)" if failing else "")
        else:
            health = "EXITED"
        lines.append(f"  {item['name']:<10} pid {item['pid']:<7} {health:<10} {item['health_url']}")
    return "\n".join(lines)


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
