"""The sync loop of one replica: claim a due relation (once across
replicas), run it, record the run; until ``stop`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import asyncpg
from prometheus_client import CollectorRegistry
from pynetdicom import _config as pynetdicom_config

from pacs_common.nodes import RemoteNode, RemoteNodeRepository, tls_client_context
from pacs_common.storage import StorageRegistry
from pacs_common.sync import RunningClaim, RunState, SyncRepository
from prefetch_scheduler.forwarding.files import InstanceFiles
from prefetch_scheduler.forwarding.metrics import ForwardMetrics
from prefetch_scheduler.forwarding.sender import BatchSender
from prefetch_scheduler.forwarding.settings import ForwardSettings
from prefetch_scheduler.prefetch.dimse import DimseTimeouts, Peer, RemoteError
from prefetch_scheduler.sync.content import RemoteContent
from prefetch_scheduler.sync.dimse import SyncScu
from prefetch_scheduler.sync.local import LocalIndex
from prefetch_scheduler.sync.metrics import SyncMetrics
from prefetch_scheduler.sync.runner import RunReport, SyncRunner
from prefetch_scheduler.sync.settings import SyncSettings

__all__ = ["run_sync"]

logger = logging.getLogger(__name__)


def _ssl_context(settings: SyncSettings) -> ssl.SSLContext | None:
    if settings.tls_ca_file is None and settings.tls_cert_file is None:
        return None
    return tls_client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)


def _sender(settings: SyncSettings, files: InstanceFiles, tls: ssl.SSLContext | None) -> BatchSender:
    """The forwarder's C-STORE sender, with our AE title and timeouts (its
    transcode counter goes to a registry of its own: not exported)."""
    forward = ForwardSettings(
        ae_title=settings.calling_ae,
        connection_timeout_seconds=settings.connect_timeout_seconds,
        acse_timeout_seconds=settings.connect_timeout_seconds,
        dimse_timeout_seconds=settings.store_timeout_seconds,
        network_timeout_seconds=settings.store_timeout_seconds,
        spool_dir=settings.spool_dir,
    )
    return BatchSender(forward, files, ForwardMetrics(CollectorRegistry()), tls)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_sync(
    pool: asyncpg.Pool,
    storage: StorageRegistry,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    *,
    settings: SyncSettings | None = None,
) -> None:
    """Run due sync relations until ``stop`` is set (``settings`` default to ``PACS_SYNC_*``)."""
    settings = settings or SyncSettings()
    if not settings.enabled:
        logger.info("sync disabled (PACS_SYNC_ENABLED=false)")
        await stop.wait()
        return
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    metrics = SyncMetrics(registry)
    tls = _ssl_context(settings)
    repository = SyncRepository(pool)
    timeouts = DimseTimeouts(
        connect=settings.connect_timeout_seconds,
        find=settings.find_timeout_seconds,
        move=settings.move_timeout_seconds,
    )
    files = InstanceFiles(storage, settings.spool_dir)
    runner = SyncRunner(
        LocalIndex(pool),
        repository,
        SyncScu(settings.calling_ae, timeouts),
        _sender(settings, files, tls),
        settings,
        metrics,
        content=RemoteContent(settings.calling_ae, timeouts),
        files=files,
    )
    logger.info("sync running", extra={"move_destination": settings.move_destination})
    while not stop.is_set():
        try:
            claim = await repository.claim(settings.lease_seconds)
        except (asyncpg.PostgresError, OSError) as exc:
            logger.warning("sync: cannot claim a relation: %s", exc)
            await _wait(stop, settings.poll_interval_seconds)
            continue
        if claim is None:
            await _wait(stop, settings.poll_interval_seconds)
            continue
        await _run_one(claim, runner, repository, settings, metrics, pool, tls, stop)


async def _renew(repository: SyncRepository, claim: RunningClaim, lease_seconds: float) -> None:
    """Keep the run's lease while it runs (a long C-MOVE included)."""
    while True:
        await asyncio.sleep(lease_seconds / 3)
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await repository.renew(claim, lease_seconds)


async def _execute(
    runner: SyncRunner,
    claim: RunningClaim,
    *,
    node: RemoteNode,
    peer: Peer,
    report: RunReport,
    stop: asyncio.Event,
) -> bool:
    """Run; False when ``stop`` came first (the run is abandoned where it is)."""
    work = asyncio.create_task(runner.run(claim, node, peer, report))
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()
            return True
        return False
    finally:
        for task in (work, stopping):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, stopping, return_exceptions=True)


async def _run_one(  # noqa: PLR0917
    claim: RunningClaim,
    runner: SyncRunner,
    repository: SyncRepository,
    settings: SyncSettings,
    metrics: SyncMetrics,
    pool: asyncpg.Pool,
    tls: ssl.SSLContext | None,
    stop: asyncio.Event,
) -> None:
    relation = claim.relation
    report = RunReport()
    state = RunState.FAILED
    error: str | None = None
    renewing = asyncio.create_task(_renew(repository, claim, settings.lease_seconds))
    try:
        node = await RemoteNodeRepository(pool).get(relation.remote_ae_title)
        if node is None:
            error = f"{relation.remote_ae_title} is not a registered node (pacs node add)"
        elif node.tls and tls is None:
            error = f"{node.ae_title} requires TLS and no TLS context is configured (PACS_SYNC_TLS_*)"
        else:
            peer = Peer(node.ae_title, node.host, node.port, tls if node.tls else None)
            if not await _execute(runner, claim, node=node, peer=peer, report=report, stop=stop):
                error = "stopped before the end (the process shut down)"
            else:
                if report.errors:
                    error = "; ".join(report.errors[:5])
                failed = report.errors or report.counts.instances_failed
                state = RunState.PARTIAL if failed else RunState.SUCCEEDED
    except RemoteError as exc:
        error = str(exc)
    except Exception as exc:
        logger.exception("sync run of %s failed", relation.name)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    metrics.runs.labels(relation.name, str(state)).inc()
    logger.info(
        "sync run of %s: %s",
        relation.name,
        state,
        extra={"relation": relation.name, "run": claim.run_id, "error": error},
    )
    await repository.finish(
        claim,
        state,
        report.counts,
        error=error,
        details={"studies": report.studies[:500], "instances_not_compared": report.not_compared},
        continuous_pause=settings.continuous_pause_seconds,
    )
