"""The study.stable announcer: a study that received nothing for the quiet
period is announced once (again after it changes).

Every worker runs one; the database hands each due study to exactly one of
them (``FOR UPDATE SKIP LOCKED``), and a claim commits only once its events
are confirmed by the broker, so an announcement survives a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ingest_worker.metrics import WorkerMetrics
from pacs_common.db.index import InstanceIndex, StableStudy
from pacs_common.messaging.broker import Broker
from pacs_common.messaging.models import StudyStable

logger = logging.getLogger(__name__)

_PAGE = 100


class StableAnnouncer:
    def __init__(
        self,
        index: InstanceIndex,
        broker: Broker,
        metrics: WorkerMetrics,
        *,
        quiet_seconds: float,
        interval_seconds: float,
    ) -> None:
        self._index = index
        self._broker = broker
        self._metrics = metrics
        self._quiet = quiet_seconds
        self._interval = interval_seconds

    async def _publish(self, studies: list[StableStudy]) -> None:
        await self._broker.publish_events(
            [
                StudyStable(
                    study_instance_uid=s.study_instance_uid,
                    patient_id=s.patient_id,
                    modalities_in_study=s.modalities_in_study,
                    number_of_series=s.number_of_series,
                    number_of_instances=s.number_of_instances,
                    last_received_at=s.last_received_at,
                )
                for s in studies
            ]
        )

    async def announce_due(self) -> int:
        """Announce every study due now; returns how many."""
        total = 0
        while True:
            claimed = await self._index.studies_to_announce(
                self._quiet, limit=_PAGE, on_claimed=self._publish
            )
            total += len(claimed)
            self._metrics.studies_stable.inc(len(claimed))
            for study in claimed:
                logger.info(
                    "study stable",
                    extra={
                        "study_instance_uid": study.study_instance_uid,
                        "number_of_instances": study.number_of_instances,
                    },
                )
            if len(claimed) < _PAGE:
                return total

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.announce_due()
            except Exception as exc:  # database or broker down: try again next tick
                logger.warning("study.stable announcement failed, will retry: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._interval)
