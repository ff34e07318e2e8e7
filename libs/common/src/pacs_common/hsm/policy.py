"""Which instances a pass moves: policy rules (or a job's explicit request)
turned into selections, and the SQL that finds their instances.

A :class:`Selection` is one set-based query over the index: instances whose
current location is in ``from_tiers`` and that match the age, last-access,
modality and study conditions.  Instances that are not ONLINE (an archived
object cannot be read until it is restored), that already have an open
move, that failed recently, or whose study is locked by somebody else are
left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pacs_common.hsm.settings import MigrationRule

__all__ = [
    "CANDIDATE_COLUMNS",
    "OPEN_MOVE_STATES",
    "Selection",
    "selection_args",
    "selection_sql",
    "selections_for_rules",
]

#: States of a move that is not finished (at most one per instance).
OPEN_MOVE_STATES: Final = ("pending", "copied", "verified", "switched")
#: Columns a candidate query returns.
CANDIDATE_COLUMNS: Final = (
    "instance_fk",
    "tier",
    "backend",
    "key",
    "size",
    "sha256",
    "study_instance_uid",
)


@dataclass(frozen=True, slots=True)
class Selection:
    """Instances to move to ``to_tier``."""

    to_tier: str
    # Tiers the instances are in now; None = any tier but ``to_tier``.
    from_tiers: tuple[str, ...] | None
    min_study_age_days: int | None = None
    not_accessed_days: int | None = None
    # Only series of these modalities (None = any) …
    modalities: tuple[str, ...] | None = None
    # … but never these (modalities another rule decides for).
    excluded_modalities: tuple[str, ...] = ()
    # Only these studies (None = any).
    study_instance_uids: tuple[str, ...] | None = None

    def restricted_to(self, study_instance_uids: Sequence[str] | None) -> Selection:
        if study_instance_uids is None:
            return self
        return Selection(
            to_tier=self.to_tier,
            from_tiers=self.from_tiers,
            min_study_age_days=self.min_study_age_days,
            not_accessed_days=self.not_accessed_days,
            modalities=self.modalities,
            excluded_modalities=self.excluded_modalities,
            study_instance_uids=tuple(study_instance_uids),
        )

    def describe(self) -> str:
        source = ",".join(self.from_tiers) if self.from_tiers else "any"
        parts = [f"{source}→{self.to_tier}"]
        if self.min_study_age_days is not None:
            parts.append(f"age≥{self.min_study_age_days}d")
        if self.not_accessed_days is not None:
            parts.append(f"idle≥{self.not_accessed_days}d")
        if self.modalities:
            parts.append("modalities=" + ",".join(self.modalities))
        if self.excluded_modalities:
            parts.append("except=" + ",".join(self.excluded_modalities))
        return " ".join(parts)


def selections_for_rules(rules: Sequence[MigrationRule], *, from_tier: str | None = None) -> list[Selection]:
    """One selection per rule; a rule without modalities leaves out the
    modalities that rules with modalities name for the same source tier
    (the per-modality overrides).  ``from_tier``: only the rules leaving it."""
    overridden: dict[str, set[str]] = {}
    for rule in rules:
        if rule.modalities:
            overridden.setdefault(rule.from_tier, set()).update(rule.modalities)
    selections = []
    for rule in rules:
        if from_tier is not None and rule.from_tier != from_tier:
            continue
        excluded = () if rule.modalities else tuple(sorted(overridden.get(rule.from_tier, ())))
        selections.append(
            Selection(
                to_tier=rule.to_tier,
                from_tiers=(rule.from_tier,),
                min_study_age_days=rule.min_study_age_days,
                not_accessed_days=rule.not_accessed_days,
                modalities=rule.modalities,
                excluded_modalities=excluded,
            )
        )
    return selections


_WHERE: Final = """
    ((($1::text[] IS NULL AND il.tier <> $2) OR il.tier = ANY($1::text[])))
    AND i.availability = 'ONLINE'
    AND ($3::int IS NULL OR CASE
            WHEN st.study_date ~ '^[0-9]{8}$'
                THEN st.study_date <= to_char(current_date - $3::int, 'YYYYMMDD')
            ELSE i.received_at <= now() - make_interval(days => $3::int)
        END)
    AND ($4::int IS NULL
         OR coalesce(greatest(i.last_accessed_at, st.last_accessed_at), i.received_at)
            <= now() - make_interval(days => $4::int))
    AND ($5::text[] IS NULL OR upper(coalesce(se.modality, '')) = ANY($5::text[]))
    AND NOT (upper(coalesce(se.modality, '')) = ANY($6::text[]))
    AND ($7::text[] IS NULL OR st.study_instance_uid = ANY($7::text[]))
    AND NOT EXISTS (
        SELECT 1 FROM hsm_move m
        WHERE m.instance_fk = il.instance_fk
          AND (m.state IN ('pending', 'copied', 'verified', 'switched')
               OR (m.state = 'failed' AND m.updated_at > now() - make_interval(secs => $8::float8)))
    )
    AND NOT EXISTS (
        SELECT 1 FROM study_lock sl
        WHERE sl.study_instance_uid = st.study_instance_uid
          AND sl.holder <> $9 AND sl.expires_at > clock_timestamp()
    )
"""

_FROM: Final = """
    FROM instance_location il
    JOIN instance i ON i.pk = il.instance_fk
    JOIN series se ON se.pk = i.series_fk
    JOIN study st ON st.pk = se.study_fk
"""


def selection_sql(*, count: bool = False, run_pk_param: bool = False) -> str:
    """The candidate query: $1…$9 are :func:`selection_args`, $10 the limit;
    with ``run_pk_param``, $11 is a run whose instances are left out (an
    instance is tried once per run).  ``count``: how many match and their
    bytes, instead (no limit, no locks)."""
    if count:
        return (
            f"SELECT count(*) AS instances, coalesce(sum(il.size), 0)::bigint AS bytes {_FROM} WHERE {_WHERE}"
        )
    columns = "il.instance_fk, il.tier, il.backend, il.key, il.size, il.sha256, st.study_instance_uid"
    once = (
        "AND NOT EXISTS (SELECT 1 FROM hsm_move r WHERE r.instance_fk = il.instance_fk AND r.run_fk = $11)"
        if run_pk_param
        else ""
    )
    return f"""
        SELECT {columns} {_FROM} WHERE {_WHERE} {once}
        ORDER BY il.stored_at, il.instance_fk
        LIMIT $10
        FOR UPDATE OF il SKIP LOCKED
    """


def selection_args(selection: Selection, *, failure_backoff_seconds: float, lock_holder: str) -> list[Any]:
    """Parameters $1…$9 of :func:`selection_sql` for ``selection``."""
    return [
        list(selection.from_tiers) if selection.from_tiers is not None else None,
        selection.to_tier,
        selection.min_study_age_days,
        selection.not_accessed_days,
        list(selection.modalities) if selection.modalities is not None else None,
        list(selection.excluded_modalities),
        list(selection.study_instance_uids) if selection.study_instance_uids is not None else None,
        float(failure_backoff_seconds),
        lock_holder,
    ]
