"""One sync run: find the differences with the remote, move what is missing,
report conflicts.

Differences are found top-down: studies within the filter on both sides
(NumberOfStudyRelatedInstances against our index's count); for a study
whose counts differ, its series (NumberOfSeriesRelatedInstances); for a
series whose counts differ, its SOP Instance UIDs.  Pulling moves a study
or series we lack whole (C-MOVE STUDY / SERIES) and the instances we lack
of a series we have (C-MOVE IMAGE, UID lists); pushing sends our instances
the remote lacks (C-STORE).  Equal counts are taken as in sync.

Conflicts (the same SOP Instance UID with different content) are found two
ways.  With ``compare_content``, the instances both sides hold are fetched
from the remote with C-GET and the sha256 of each dataset (file meta left
out) compared with ours; a difference is recorded once per pair of contents
and the policy applied the only way DICOM allows: keep-local sends our copy
there, keep-remote moves theirs here, and the receiving side's duplicate
policy decides whether it replaces what it holds; keep-both-report only
reports.  Always, when the remote sends us an object whose UID we hold
(``instance_superseded`` rows with the remote's AE title, written by the
ingest worker), it is recorded once with what the ingest kept."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pacs_common.nodes import RemoteNode
from pacs_common.sync import ConflictPolicy, Direction, RunCounts, RunningClaim, SyncFilter, SyncRepository
from prefetch_scheduler.forwarding.files import InstanceFiles, UnavailableError
from prefetch_scheduler.forwarding.queue import ItemOutcome
from prefetch_scheduler.forwarding.sender import BatchSender, OutgoingInstance
from prefetch_scheduler.prefetch.dimse import Peer, RemoteError
from prefetch_scheduler.sync.content import RemoteContent, dataset_digest
from prefetch_scheduler.sync.dimse import RemoteSeries, SyncScu
from prefetch_scheduler.sync.local import LocalIndex, LocalSeries, Superseded
from prefetch_scheduler.sync.metrics import SyncMetrics
from prefetch_scheduler.sync.settings import SyncSettings

__all__ = ["RunReport", "SyncRunner"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunReport:
    counts: RunCounts = field(default_factory=RunCounts)
    errors: list[str] = field(default_factory=list)
    # Instances both sides hold whose content could not be compared.
    not_compared: int = 0
    studies: list[dict[str, Any]] = field(default_factory=list)


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _series_admitted(where: SyncFilter, modality: str | None) -> bool:
    return not where.modalities or (modality or "").upper() in where.modalities


class SyncRunner:
    def __init__(  # noqa: PLR0917
        self,
        index: LocalIndex,
        repository: SyncRepository,
        scu: SyncScu,
        sender: BatchSender,
        settings: SyncSettings,
        metrics: SyncMetrics,
        *,
        content: RemoteContent,
        files: InstanceFiles,
    ) -> None:
        self._content = content
        self._files = files
        self._index = index
        self._repository = repository
        self._scu = scu
        self._sender = sender
        self._settings = settings
        self._metrics = metrics

    @staticmethod
    async def _call(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(function, *args)

    async def run(self, claim: RunningClaim, node: RemoteNode, peer: Peer, report: RunReport) -> None:
        """Compare and move; ``report`` counts as it goes (what it holds stays
        true when the run is cancelled part-way)."""
        relation = claim.relation
        # Conflicts the ingest saw since the last run (objects the remote sent us).
        await self._record_conflicts(claim, report)
        remote = {s.study_instance_uid: s for s in await self._call(self._scu.studies, peer, relation.filter)}
        local = {s.study_instance_uid: s for s in await self._index.studies(relation.filter)}
        direction = relation.direction
        for uid in sorted(set(remote) | set(local)):
            report.counts.studies_compared += 1
            remote_count = remote[uid].instances if uid in remote else 0
            local_count = local[uid].instances if uid in local else 0
            same = remote_count == local_count
            compare = relation.compare_content and uid in remote and uid in local
            # Only what the direction lets move makes a study different.
            movable = (direction.pulls and uid in remote) or (direction.pushes and uid in local)
            if (same or not movable) and not compare:
                continue
            if not same and movable:
                report.counts.studies_different += 1
            outcome: dict[str, Any] = {
                "study_instance_uid": uid,
                "remote": remote_count,
                "local": local_count,
            }
            try:
                pulled, pushed, failed = await self._study(claim, node, peer, uid, uid in local, report)
                outcome.update(pulled=pulled, pushed=pushed, failed=failed)
            except RemoteError as exc:
                report.errors.append(f"{uid}: {exc}")
                outcome["error"] = str(exc)
                pulled = pushed = failed = 0
            report.counts.instances_pulled += pulled
            report.counts.instances_pushed += pushed
            if pulled:
                self._metrics.instances.labels(relation.name, "pull").inc(pulled)
            if pushed:
                self._metrics.instances.labels(relation.name, "push").inc(pushed)
            report.counts.instances_failed += failed
            report.studies.append(outcome)
            await self._repository.renew(claim, self._settings.lease_seconds)

    async def _study(  # noqa: PLR0917
        self, claim: RunningClaim, node: RemoteNode, peer: Peer, uid: str, held: bool, report: RunReport
    ) -> tuple[int, int, int]:
        relation = claim.relation
        where = relation.filter
        direction: Direction = relation.direction
        destination = self._settings.move_destination
        pulled = pushed = failed = 0
        compare = relation.compare_content
        if direction.pulls and not held and not where.modalities:
            result = await self._call(self._scu.move, peer, destination, uid)
            return result.completed + result.warning, 0, result.failed
        remote_series: dict[str, RemoteSeries] = {
            s.series_instance_uid: s
            for s in await self._call(self._scu.series, peer, uid)
            if _series_admitted(where, s.modality)
        }
        local_series: dict[str, LocalSeries] = {
            s.series_instance_uid: s
            for s in await self._index.series(uid)
            if _series_admitted(where, s.modality)
        }
        for series_uid in sorted(set(remote_series) | set(local_series)):
            there = remote_series.get(series_uid)
            here = local_series.get(series_uid)
            same = (there.instances if there else 0) == (here.instances if here else 0)
            if same and not (compare and there is not None and here is not None):
                continue
            if direction.pulls and there is not None and here is None:
                result = await self._call(self._scu.move, peer, destination, uid, series_uid)
                pulled += result.completed + result.warning
                failed += result.failed
                continue
            remote_uids = await self._call(self._scu.instances, peer, uid, series_uid) if there else set()
            local_uids = await self._index.instances(series_uid) if here else set()
            if direction.pulls and (missing_here := sorted(remote_uids - local_uids)):
                for chunk in _chunks(missing_here, self._settings.move_batch_size):
                    result = await self._call(self._scu.move, peer, destination, uid, series_uid, chunk)
                    pulled += result.completed + result.warning
                    failed += result.failed
            if direction.pushes and (missing_there := sorted(local_uids - remote_uids)):
                sent, not_sent = await self._push(node, missing_there)
                pushed += sent
                failed += not_sent
            if compare and (common := sorted(remote_uids & local_uids)):
                await self._compare(claim, node, peer, uid, series_uid, common, report)
        return pulled, pushed, failed

    async def _compare(  # noqa: PLR0917
        self,
        claim: RunningClaim,
        node: RemoteNode,
        peer: Peer,
        study_uid: str,
        series_uid: str,
        sop_instance_uids: Sequence[str],
        report: RunReport,
    ) -> None:
        """Digests of both copies of each instance; a difference is a conflict."""
        relation = claim.relation
        for chunk in _chunks(sop_instance_uids, self._settings.move_batch_size):
            outgoing = [
                o for o in await self._index.outgoing(chunk) if o.tier is not None and o.key is not None
            ]
            if not outgoing:
                continue
            theirs = await self._call(self._content.digests, peer, study_uid, series_uid, outgoing)
            for instance in outgoing:
                remote = theirs.get(instance.sop_instance_uid)
                if remote is None or remote.transfer_syntax_uid != instance.transfer_syntax_uid:
                    report.not_compared += 1  # not sent, or in another syntax: not comparable
                    continue
                local_sha = await self._call(self._local_digest, instance)
                if local_sha is None:
                    report.not_compared += 1
                    continue
                if local_sha == remote.sha256:
                    continue
                recorded = await self._repository.record_conflict(
                    claim,
                    sop_instance_uid=instance.sop_instance_uid,
                    study_instance_uid=study_uid,
                    local_sha256=local_sha,
                    remote_sha256=remote.sha256,
                    resolution=_digest_resolution(relation.conflict_policy),
                )
                if not recorded:
                    continue  # the same pair of contents was reported before
                report.counts.conflicts += 1
                self._metrics.conflicts.labels(relation.name).inc()
                await self._apply(claim, node, peer, study_uid, series_uid, instance.sop_instance_uid)

    async def _apply(  # noqa: PLR0917
        self, claim: RunningClaim, node: RemoteNode, peer: Peer, study_uid: str, series_uid: str, sop_uid: str
    ) -> None:
        """Send the copy the policy keeps to the other side; that side's
        duplicate policy decides whether it replaces what it holds."""
        policy = claim.relation.conflict_policy
        if policy is ConflictPolicy.KEEP_LOCAL:
            await self._push(node, [sop_uid])
        elif policy is ConflictPolicy.KEEP_REMOTE:
            destination = self._settings.move_destination
            await self._call(self._scu.move, peer, destination, study_uid, series_uid, [sop_uid])

    def _local_digest(self, instance: OutgoingInstance) -> str | None:
        assert instance.tier is not None and instance.key is not None
        try:
            with self._files.local_file(instance.tier, instance.key) as path:
                return dataset_digest(path)
        except (UnavailableError, ValueError, OSError):
            return None

    async def _push(self, node: RemoteNode, sop_instance_uids: Sequence[str]) -> tuple[int, int]:
        sent = not_sent = 0
        for chunk in _chunks(sop_instance_uids, self._settings.push_batch_size):
            outgoing = await self._index.outgoing(chunk)
            results = await self._call(self._sender.send, node, outgoing)
            for result in results:
                if result.outcome in (ItemOutcome.SENT, ItemOutcome.WARNING):
                    sent += 1
                else:
                    not_sent += 1
                    logger.warning("sync push to %s: %s", node.ae_title, result.reason)
        return sent, not_sent

    async def _record_conflicts(self, claim: RunningClaim, report: RunReport) -> None:
        relation = claim.relation
        for item in await self._index.superseded_from(relation.remote_ae_title, relation.id):
            local_sha, remote_sha, resolution = _resolution(item, relation.conflict_policy)
            if await self._repository.record_conflict(
                claim,
                sop_instance_uid=item.sop_instance_uid,
                study_instance_uid=item.study_instance_uid,
                local_sha256=local_sha,
                remote_sha256=remote_sha,
                resolution=resolution,
                superseded_pk=item.pk,
            ):
                report.counts.conflicts += 1
                self._metrics.conflicts.labels(relation.name).inc()


def _digest_resolution(policy: ConflictPolicy) -> str:
    if policy is ConflictPolicy.KEEP_LOCAL:
        return "local copy sent to the remote (its duplicate policy decides)"
    if policy is ConflictPolicy.KEEP_REMOTE:
        return "remote copy moved here (our duplicate policy decides)"
    return "reported (both copies kept)"


def _resolution(item: Superseded, policy: ConflictPolicy) -> tuple[str | None, str | None, str]:
    """(our digest, the remote's digest, what became of it) for a superseded object."""
    local_sha: str | None
    remote_sha: str | None
    if item.decision == "kept-first":
        # The remote's object was set aside; ours stays indexed.
        local_sha, remote_sha, outcome = item.kept_sha256 or item.current_sha256, item.sha256, "kept-local"
    else:
        # Ours was set aside; the remote's is indexed now.
        local_sha, remote_sha, outcome = item.sha256, item.current_sha256, "replaced-by-remote"
    if policy is ConflictPolicy.KEEP_BOTH_REPORT:
        return local_sha, remote_sha, f"reported ({outcome}, both objects kept)"
    wanted = "kept-local" if policy is ConflictPolicy.KEEP_LOCAL else "replaced-by-remote"
    if wanted == outcome:
        return local_sha, remote_sha, outcome
    return local_sha, remote_sha, f"{outcome} (ingest duplicate policy; {policy} not applied)"
