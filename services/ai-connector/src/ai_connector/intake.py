"""From a study.stable event to AI requests: match the rules against the
study's series in the index and create one request (and job) per matching
rule — at most one per (rule, study), whoever asks and however often."""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg

from ai_connector.matching import load_series, match_rules
from ai_connector.metrics import ConnectorMetrics
from ai_connector.request_store import RequestStore
from pacs_common.ai import AiRuleRepository
from pacs_common.messaging.models import StudyStable

__all__ = ["StudyIntake"]

logger = logging.getLogger(__name__)


class StudyIntake:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: RequestStore,
        metrics: ConnectorMetrics,
        *,
        on_created: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._store = store
        self._metrics = metrics
        self._on_created = on_created

    async def handle(self, event: StudyStable) -> list[int]:
        """The ids of the requests created for ``event`` (none when every
        matching rule already has one for the study)."""
        rules = await AiRuleRepository(self._pool).list(enabled_only=True)
        if not rules:
            return []
        study = await load_series(self._pool, event.study_instance_uid)
        created: list[int] = []
        for match in match_rules(rules, study):
            request_id = await self._store.create(
                match.rule, event.study_instance_uid, match.series_instance_uids
            )
            if request_id is None:
                continue
            created.append(request_id)
            self._metrics.requests.labels(match.rule.name).inc()
            logger.info(
                "AI request created",
                extra={"rule": match.rule.name, "study": event.study_instance_uid, "request": request_id},
            )
        if created:
            self._on_created()
        return created
