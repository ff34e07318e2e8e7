"""``pacs tasks`` against the real index: list, show, set (cron, interval,
params, validated per kind), pause / resume (next run recomputed),
trigger, history, retention holds; and the repository's schedule rules."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from pacs_common.cli.main import main
from pacs_common.settings import DatabaseSettings
from pacs_common.tasks import RunStatus, TaskKind, TaskRepository

Pacs = Callable[..., tuple[int, str, str]]


@pytest.fixture
def pacs(
    database_settings: DatabaseSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Pacs:
    monkeypatch.setenv("PACS_DB_URL", database_settings.url)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["-C", str(tmp_path), "tasks", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def test_list_show_set_pause_resume_trigger(db_pool: asyncpg.Pool, pacs: Pacs) -> None:
    run = pacs
    tasks = TaskRepository(db_pool)
    await tasks.create("integrity", TaskKind.INTEGRITY, cron="0 2 * * *")
    await tasks.create("retention", TaskKind.RETENTION, interval_seconds=86400, params={"rules": []})

    code, out, _ = run("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "SCHEDULE", "PAUSED"]
    assert "integrity" in lines[1] and "cron 0 2 * * *" in lines[1]
    assert "retention" in lines[2] and "every 86400s" in lines[2]

    code, out, _ = run(
        "set",
        "retention",
        "--cron",
        "30 4 * * *",
        "--params",
        '{"rules": [{"modality": "CR", "days": 3650}]}',
    )
    assert code == 0 and "cron 30 4 * * *" in out
    task = await tasks.require("retention")
    assert (task.cron, task.interval_seconds) == ("30 4 * * *", None)
    assert task.params == {"rules": [{"modality": "CR", "days": 3650}]}
    assert task.next_run_at is not None and (task.next_run_at.hour, task.next_run_at.minute) == (4, 30)

    code, _, _ = run("set", "integrity", "--interval", "600")
    task = await tasks.require("integrity")
    assert code == 0 and (task.cron, task.interval_seconds) == (None, 600)
    assert task.next_run_at is not None
    assert abs(task.next_run_at - (datetime.now(UTC) + timedelta(seconds=600))) < timedelta(seconds=30)

    code, _, err = run("set", "integrity", "--cron", "every night")
    assert code == 1 and "cron" in err
    code, _, err = run("set", "retention", "--params", '{"rules": [{"modality": "CR", "days": 0}]}')
    assert code == 1 and "days" in err
    code, _, err = run("set", "retention", "--params", '{"rulez": []}')
    assert code == 1 and "rulez" in err
    code, _, err = run("set", "nope", "--interval", "60")
    assert code == 1 and "no task named 'nope'" in err

    code, out, _ = run("pause", "integrity")
    assert code == 0 and (await tasks.require("integrity")).paused
    # Paused past its due time, resumed: the next run is computed from now, not overdue.
    await db_pool.execute(
        "UPDATE scheduled_task SET next_run_at = now() - interval '1 day' WHERE name = 'integrity'"
    )
    code, out, _ = run("resume", "integrity")
    resumed = await tasks.require("integrity")
    assert code == 0 and not resumed.paused
    assert resumed.next_run_at is not None and resumed.next_run_at > datetime.now(UTC)

    code, out, _ = run("trigger", "integrity")
    assert code == 0 and "triggered integrity" in out
    assert (await tasks.require("integrity")).trigger_requested

    code, out, _ = run("show", "integrity", "--json")
    shown = json.loads(out)
    assert (shown["name"], shown["interval_seconds"], shown["trigger_requested"]) == ("integrity", 600, True)
    code, out, _ = run("show", "integrity")
    assert "every 600s" in out and "triggered" in out


async def test_history_lists_runs_newest_first(db_pool: asyncpg.Pool, pacs: Pacs) -> None:
    run = pacs
    tasks = TaskRepository(db_pool)
    await tasks.create("orphans", TaskKind.ORPHANS, interval_seconds=60)
    code, out, _ = run("history", "orphans")
    assert code == 0 and "has not run yet" in out
    for status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
        await tasks.trigger("orphans")
        claim = await tasks.claim("cli-test", 30)
        assert claim is not None
        await tasks.finish(
            claim, "cli-test", status, summary={"deleted": 2}, error="boom" if status == "failed" else None
        )
    code, out, _ = run("history", "orphans", "--limit", "5")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert "failed" in lines[1] and "error: boom" in lines[1] and "deleted=2" in lines[2]
    code, out, _ = run("history", "orphans", "--json", "--limit", "1")
    assert [r["status"] for r in json.loads(out)] == ["failed"]
    code, _, err = run("history", "nope")
    assert code == 1 and "no task named" in err


async def test_hold_and_unhold(db_pool: asyncpg.Pool, pacs: Pacs) -> None:
    run = pacs
    code, out, _ = run("hold", "1.2.3.4", "--reason", "legal")
    assert code == 0 and "1.2.3.4" in out
    code, out, _ = run("holds")
    assert "1.2.3.4" in out and "legal" in out
    assert [h.study_instance_uid for h in await TaskRepository(db_pool).holds()] == ["1.2.3.4"]
    code, _, _ = run("unhold", "1.2.3.4")
    assert code == 0
    code, _, err = run("unhold", "1.2.3.4")
    assert code == 1 and "not on retention hold" in err


async def test_claim_advances_the_schedule_and_a_trigger_keeps_it(db_pool: asyncpg.Pool) -> None:
    tasks = TaskRepository(db_pool)
    created = await tasks.create("integrity", TaskKind.INTEGRITY, cron="0 2 * * *")
    assert created.next_run_at is not None and created.next_run_at > datetime.now(UTC)
    assert await tasks.claim("r1", 30) is None  # not due

    await tasks.trigger("integrity")
    claim = await tasks.claim("r1", 30)
    assert claim is not None and claim.run.trigger == "manual"
    assert claim.task.next_run_at == created.next_run_at  # a manual run does not move the schedule
    assert await tasks.claim("r2", 30) is None  # leased
    await tasks.finish(claim, "r1", RunStatus.SUCCEEDED, summary={})

    await db_pool.execute("UPDATE scheduled_task SET next_run_at = now() - interval '3 days'")
    due = await tasks.claim("r2", 30)
    assert due is not None and due.run.trigger == "scheduled"
    # Missed occurrences are not run one by one: the next is the next one from now.
    assert due.task.next_run_at is not None and due.task.next_run_at > datetime.now(UTC)
    assert due.task.next_run_at - datetime.now(UTC) <= timedelta(days=1)


async def test_seeded_tasks_are_scheduled_by_the_first_scheduler(db_pool: asyncpg.Pool) -> None:
    await db_pool.execute(
        "INSERT INTO scheduled_task (name, kind, cron) VALUES ('integrity', 'integrity', '0 2 * * *')"
    )
    tasks = TaskRepository(db_pool)
    assert (await tasks.require("integrity")).next_run_at is None
    assert await tasks.schedule_unscheduled() == 1
    scheduled = await tasks.require("integrity")
    assert scheduled.next_run_at is not None and (
        scheduled.next_run_at.hour,
        scheduled.next_run_at.minute,
    ) == (2, 0)
