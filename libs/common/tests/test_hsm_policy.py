"""Policy rules → which instances a pass selects (pacs_common.hsm.policy),
against the real index: study age (StudyDate, else received), last
access (instance or study, else received), per-modality overrides, study
locks, open and failed moves."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from pydantic import ValidationError

from pacs_common import locks
from pacs_common.hsm.availability import set_availability
from pacs_common.hsm.policy import Selection, selection_args, selection_sql, selections_for_rules
from pacs_common.hsm.settings import HsmSettings, MigrationRule
from pacs_common.hsm.testing import SeededInstance, seed_instances
from pacs_common.storage.filesystem import FilesystemStorage

NOW = datetime.now(UTC)


def _days_ago(days: int) -> str:
    return (date.today() - timedelta(days=days)).strftime("%Y%m%d")


async def _selected(pool: asyncpg.Pool, selection: Selection, *, backoff: float = 3600.0) -> set[int]:
    async with pool.acquire() as connection, connection.transaction():
        rows = await connection.fetch(
            selection_sql(),
            *selection_args(selection, failure_backoff_seconds=backoff, lock_holder="hsm-migrator"),
            10_000,
        )
    return {int(row["instance_fk"]) for row in rows}


async def _all_selected(pool: asyncpg.Pool, rules: list[MigrationRule]) -> dict[str, set[int]]:
    """to_tier → instances the rules select."""
    result: dict[str, set[int]] = {}
    for selection in selections_for_rules(rules):
        result.setdefault(selection.to_tier, set()).update(await _selected(pool, selection))
    return result


def _pks(instances: list[SeededInstance]) -> set[int]:
    return {i.pk for i in instances}


async def test_study_age_by_study_date_or_received(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage
) -> None:
    old = await seed_instances(db_pool, fs_storage, instances_per_series=2, study_date=_days_ago(40))
    recent = await seed_instances(db_pool, fs_storage, study_date=_days_ago(5))
    # No StudyDate: its age is when it was received.
    undated_old = await seed_instances(db_pool, fs_storage, received_at=NOW - timedelta(days=45))
    undated_new = await seed_instances(db_pool, fs_storage, received_at=NOW - timedelta(days=2))
    # An old StudyDate decides even for a study received today (an imported prior).
    imported = await seed_instances(db_pool, fs_storage, study_date="20100101")

    rule = MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=30)
    selected = await _all_selected(db_pool, [rule])
    assert selected["warm"] == _pks(old) | _pks(undated_old) | _pks(imported)
    assert not selected["warm"] & (_pks(recent) | _pks(undated_new))

    # Only instances in the rule's source tier.
    await db_pool.execute("UPDATE instance_location SET tier = 'warm' WHERE instance_fk = $1", old[0].pk)
    assert old[0].pk not in await _selected(db_pool, selections_for_rules([rule])[0])


async def test_last_access_of_instance_or_study(db_pool: asyncpg.Pool, fs_storage: FilesystemStorage) -> None:
    long_ago = NOW - timedelta(days=100)
    idle = await seed_instances(db_pool, fs_storage, received_at=long_ago)
    read_recently = await seed_instances(db_pool, fs_storage, received_at=long_ago)
    study_opened = await seed_instances(db_pool, fs_storage, instances_per_series=2, received_at=long_ago)
    read_long_ago = await seed_instances(db_pool, fs_storage, received_at=long_ago)
    new = await seed_instances(db_pool, fs_storage)
    await db_pool.execute(
        "UPDATE instance SET last_accessed_at = now() - interval '1 day' WHERE pk = $1", read_recently[0].pk
    )
    await db_pool.execute(
        "UPDATE instance SET last_accessed_at = now() - interval '50 days' WHERE pk = $1", read_long_ago[0].pk
    )
    await db_pool.execute(
        "UPDATE study SET last_accessed_at = now() - interval '3 days' WHERE study_instance_uid = $1",
        study_opened[0].study_instance_uid,
    )
    rule = MigrationRule(from_tier="hot", to_tier="cold", not_accessed_days=30)
    selected = (await _all_selected(db_pool, [rule]))["cold"]
    assert selected == _pks(idle) | _pks(read_long_ago)
    assert not selected & (_pks(read_recently) | _pks(study_opened) | _pks(new))

    # Age and last access together: both must hold.
    both = MigrationRule(from_tier="hot", to_tier="cold", min_study_age_days=60, not_accessed_days=30)
    await db_pool.execute(
        "UPDATE instance SET received_at = now() - interval '40 days' WHERE pk = $1", read_long_ago[0].pk
    )
    assert (await _all_selected(db_pool, [both]))["cold"] == _pks(idle)


async def test_modality_overrides(db_pool: asyncpg.Pool, fs_storage: FilesystemStorage) -> None:
    ct = await seed_instances(db_pool, fs_storage, modality="CT", study_date=_days_ago(60))
    mg_young = await seed_instances(db_pool, fs_storage, modality="MG", study_date=_days_ago(60))
    mg_old = await seed_instances(db_pool, fs_storage, modality="MG", study_date=_days_ago(400))
    us = await seed_instances(db_pool, fs_storage, modality="US", study_date=_days_ago(10))
    rules = [
        MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=30),
        # Mammograms stay hot for a year (priors are compared for years).
        MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=365, modalities=("mg",)),
        # Ultrasound goes to cold straight away after a week.
        MigrationRule(from_tier="hot", to_tier="cold", min_study_age_days=7, modalities=("US",)),
    ]
    selected = await _all_selected(db_pool, rules)
    assert selected["warm"] == _pks(ct) | _pks(mg_old)
    assert selected["cold"] == _pks(us)
    assert not (selected["warm"] | selected["cold"]) & _pks(mg_young)


async def test_locked_studies_and_open_or_failed_moves_are_left_out(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage
) -> None:
    locked = await seed_instances(db_pool, fs_storage, study_date="20200101")
    mine = await seed_instances(db_pool, fs_storage, study_date="20200101")
    moving = await seed_instances(db_pool, fs_storage, study_date="20200101")
    failed = await seed_instances(db_pool, fs_storage, study_date="20200101")
    free = await seed_instances(db_pool, fs_storage, study_date="20200101")
    async with db_pool.acquire() as connection:
        await locks.acquire(
            connection, locked[0].study_instance_uid, "alice", mode=locks.LockMode.SHARED, ttl_seconds=60
        )
        await locks.acquire(
            connection,
            mine[0].study_instance_uid,
            "hsm-migrator",
            mode=locks.LockMode.EXCLUSIVE,
            ttl_seconds=60,
        )
    for instance, state in ((moving[0], "copied"), (failed[0], "failed")):
        await db_pool.execute(
            """
            INSERT INTO hsm_move (instance_fk, study_instance_uid, state, source_tier, source_backend, source_key,
                                  size, sha256, target_tier, target_backend, target_key)
            VALUES ($1, $2, $3, 'hot', 'filesystem', $4, $5, $6, 'warm', 's3', $4)
            """,
            instance.pk,
            instance.study_instance_uid,
            state,
            instance.key,
            instance.size,
            instance.sha256,
        )
    selection = Selection(to_tier="warm", from_tiers=("hot",), min_study_age_days=1)
    assert await _selected(db_pool, selection) == _pks(mine) | _pks(free)
    # Once the failure backoff has passed, a failed instance is tried again.
    assert await _selected(db_pool, selection, backoff=0) == _pks(mine) | _pks(free) | _pks(failed)


async def test_explicit_selection_any_source_and_studies(
    db_pool: asyncpg.Pool, fs_storage: FilesystemStorage
) -> None:
    first = await seed_instances(db_pool, fs_storage, instances_per_series=3)
    second = await seed_instances(db_pool, fs_storage)
    await db_pool.execute("UPDATE instance_location SET tier = 'cold' WHERE instance_fk = $1", first[0].pk)
    anywhere_to_warm = Selection(to_tier="warm", from_tiers=None)
    assert await _selected(db_pool, anywhere_to_warm) == _pks(first) | _pks(second)
    only_first = anywhere_to_warm.restricted_to([first[0].study_instance_uid])
    assert await _selected(db_pool, only_first) == _pks(first)
    into_cold = Selection(to_tier="cold", from_tiers=None)
    assert await _selected(db_pool, into_cold) == {first[1].pk, first[2].pk} | _pks(second)
    # An archived (NEARLINE) instance cannot be read, so it cannot be moved until restored.
    async with db_pool.acquire() as connection:
        await set_availability(connection, [first[0].pk, first[1].pk], "NEARLINE")
    assert await _selected(db_pool, anywhere_to_warm) == {first[2].pk} | _pks(second)


def test_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="two tiers"):
        MigrationRule(from_tier="hot", to_tier="HOT", min_study_age_days=1)
    with pytest.raises(ValidationError, match="min_study_age_days and/or not_accessed_days"):
        MigrationRule(from_tier="hot", to_tier="warm")
    with pytest.raises(ValidationError, match="two rules move modality CT"):
        HsmSettings(
            rules=[
                MigrationRule(from_tier="hot", to_tier="warm", min_study_age_days=1, modalities=("CT",)),
                MigrationRule(from_tier="hot", to_tier="cold", min_study_age_days=9, modalities=("ct", "MR")),
            ]
        )


def test_rules_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PACS_HSM_RULES",
        '[{"from_tier": "hot", "to_tier": "warm", "min_study_age_days": 30},'
        ' {"from_tier": "warm", "to_tier": "cold", "not_accessed_days": 180, "modalities": ["CT"]}]',
    )
    monkeypatch.setenv("PACS_HSM_INTERVAL_SECONDS", "60")
    settings = HsmSettings()
    assert settings.interval_seconds == 60
    assert settings.rules[1] == MigrationRule(
        from_tier="warm", to_tier="cold", not_accessed_days=180, modalities=("CT",)
    )
    assert settings.tiers_named() == {"hot", "warm", "cold"}
