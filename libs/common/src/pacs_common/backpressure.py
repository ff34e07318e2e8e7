"""Backpressure for the receivers (C-STORE, STOW-RS): refuse new work, with a
retryable answer, while the archive behind them is overloaded.

Two signals, each with its own threshold (``PACS_BACKPRESSURE_*``):

* the ingest backlog — messages ready in the namespace's ingest queue, read
  by a :class:`BacklogSampler` every ``sample_interval_seconds`` with a
  passive queue declare (never per instance);
* storage write latency — the median duration of the hot-tier writes of the
  last ``storage_window_seconds`` (measured by :class:`TimedStorage` around
  the receiver's storage).

Hysteresis keeps the state from flapping: a signal starts refusals when it
reaches its maximum and stops them only once it is back at or below
``resume_fraction`` of it.  While refusing for latency nothing is written,
so the latency samples age out of the window; the next writes probe the
storage again.

A receiver asks :meth:`Backpressure.refusal` before it takes work and
answers the sender with the refusal (C-STORE 0xA700 with an ErrorComment,
STOW-RS 503 with Retry-After).  The broker's hard cap
(``PACS_AMQP_INGEST_QUEUE_MAX_LENGTH``, ``x-overflow: reject-publish``)
stays behind this as the last line: a publish into a full queue is nacked
and the sender gets a failure, never success.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pacs_common.messaging.queue_depth import QueueDepthProbe
from pacs_common.settings import BrokerSettings
from pacs_common.storage.base import ObjectInfo, ObjectStorage, StoredObject

__all__ = [
    "BacklogProbe",
    "BacklogSampler",
    "Backpressure",
    "BackpressureSettings",
    "Refusal",
    "RefusalReason",
    "TimedStorage",
    "start_backlog_sampler",
]

log = logging.getLogger(__name__)

#: Reads the ingest backlog (messages ready); raises when it cannot.
BacklogProbe = Callable[[], Awaitable[int]]

_LATENCY_SAMPLES_MAX = 256


class BackpressureSettings(BaseSettings):
    """When the receivers refuse new instances (``PACS_BACKPRESSURE_*``)."""

    model_config = SettingsConfigDict(env_prefix="PACS_BACKPRESSURE_", extra="ignore")

    enabled: bool = True
    # Messages ready in the ingest queue at which receivers start refusing
    # (None: never for this reason).  Below the broker's hard cap
    # (PACS_AMQP_INGEST_QUEUE_MAX_LENGTH) so senders are told to retry
    # before publishes start to fail.
    max_ingest_backlog: int | None = Field(default=100_000, ge=1)
    # Median hot-tier write time (seconds) at which receivers start refusing
    # (None: never for this reason).
    max_storage_write_seconds: float | None = Field(default=10.0, gt=0)
    # Refusals stop once a signal is back at or below this fraction of its maximum.
    resume_fraction: float = Field(default=0.8, gt=0, lt=1)
    # How often the ingest backlog is read from the broker.
    sample_interval_seconds: float = Field(default=2.0, gt=0)
    # Storage writes older than this do not count; fewer than
    # storage_min_samples recent writes never start refusals.
    storage_window_seconds: float = Field(default=30.0, gt=0)
    storage_min_samples: int = Field(default=5, ge=1)
    # What a refused sender is told to wait (STOW-RS Retry-After).
    retry_after_seconds: int = Field(default=30, ge=1)


class RefusalReason(StrEnum):
    INGEST_BACKLOG = "ingest_backlog"
    STORAGE_LATENCY = "storage_latency"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why new work is refused right now; ``message`` fits an ErrorComment (64)."""

    reason: RefusalReason
    message: str
    retry_after_seconds: int


class Backpressure:
    """The refusing state of one process; thread-safe, cheap to ask."""

    def __init__(self, settings: BackpressureSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._backlog: int | None = None
        self._backlog_refusing = False
        self._writes: deque[tuple[float, float]] = deque(maxlen=_LATENCY_SAMPLES_MAX)
        self._write_median: float | None = None
        self._latency_refusing = False

    # -- signals -------------------------------------------------------------

    def observe_backlog(self, ready: int) -> None:
        """A fresh reading of the messages ready in the ingest queue."""
        maximum = self.settings.max_ingest_backlog
        with self._lock:
            self._backlog = ready
            if maximum is None:
                self._backlog_refusing = False
            elif not self._backlog_refusing and ready >= maximum:
                self._backlog_refusing = True
                log.warning("refusing new instances: ingest backlog %d >= %d", ready, maximum)
            elif self._backlog_refusing and ready <= maximum * self.settings.resume_fraction:
                self._backlog_refusing = False
                log.warning("accepting new instances again: ingest backlog %d", ready)

    def observe_storage_write(self, seconds: float) -> None:
        """The duration of one hot-tier write."""
        with self._lock:
            now = self._clock()
            self._writes.append((now, seconds))
            self._evaluate_latency(now)

    def _evaluate_latency(self, now: float) -> None:
        maximum = self.settings.max_storage_write_seconds
        horizon = now - self.settings.storage_window_seconds
        while self._writes and self._writes[0][0] < horizon:
            self._writes.popleft()
        enough = len(self._writes) >= self.settings.storage_min_samples
        self._write_median = statistics.median(s for _, s in self._writes) if self._writes else None
        median = self._write_median
        if maximum is None or median is None:
            self._latency_refusing = False
        elif not self._latency_refusing and enough and median >= maximum:
            self._latency_refusing = True
            log.warning("refusing new instances: storage writes take %.2fs (median)", median)
        elif self._latency_refusing and (not enough or median <= maximum * self.settings.resume_fraction):
            self._latency_refusing = False
            log.warning("accepting new instances again: storage write latency recovered")

    # -- state ---------------------------------------------------------------

    @property
    def backlog(self) -> int | None:
        """The last ingest backlog read (None: not read yet)."""
        return self._backlog

    def refusal(self) -> Refusal | None:
        """Why to refuse new work now, or None to accept it."""
        if not self.settings.enabled:
            return None
        retry = self.settings.retry_after_seconds
        with self._lock:
            if self._backlog_refusing:
                return Refusal(
                    RefusalReason.INGEST_BACKLOG,
                    f"busy: ingest backlog {self._backlog}, retry later",
                    retry,
                )
            if self._latency_refusing:
                self._evaluate_latency(self._clock())  # samples age out while nothing is written
            if self._latency_refusing:
                return Refusal(
                    RefusalReason.STORAGE_LATENCY,
                    f"busy: storage writes take {self._write_median or 0:.1f}s, retry later",
                    retry,
                )
        return None

    @property
    def refusing(self) -> bool:
        return self.refusal() is not None

    def timed(self, storage: ObjectStorage) -> ObjectStorage:
        """``storage`` with every write timed into this state."""
        return TimedStorage(storage, self.observe_storage_write)


class TimedStorage(ObjectStorage):
    """An :class:`ObjectStorage` that reports the duration of each write
    (successful or not) to ``observe``; everything else passes through."""

    def __init__(self, inner: ObjectStorage, observe: Callable[[float], None]) -> None:
        self._inner = inner
        self._observe = observe
        self.kind = inner.kind

    def put(self, key: str, stream: BinaryIO, *, size: int | None = None) -> StoredObject:
        started = time.perf_counter()
        try:
            return self._inner.put(key, stream, size=size)
        finally:
            self._observe(time.perf_counter() - started)

    def put_file(self, key: str, path: Path) -> StoredObject:
        started = time.perf_counter()
        try:
            return self._inner.put_file(key, path)
        finally:
            self._observe(time.perf_counter() - started)

    def open(self, key: str) -> BinaryIO:
        return self._inner.open(key)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self._inner.read_range(key, start, length)

    def stat(self, key: str) -> ObjectInfo | None:
        return self._inner.stat(key)

    def exists(self, key: str) -> bool:
        return self._inner.exists(key)

    def delete(self, key: str) -> None:
        self._inner.delete(key)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return self._inner.iter_keys(prefix)

    def close(self) -> None:
        self._inner.close()


class BacklogSampler:
    """Reads the ingest backlog every ``sample_interval_seconds`` into a
    :class:`Backpressure`, on an event loop in a daemon thread of its own (so
    it serves threaded and asyncio services alike).

    A failed reading keeps the last state: a broker that cannot be read is
    not a reason to refuse (publishing then fails on its own) nor to stop
    refusing.
    """

    def __init__(
        self,
        state: Backpressure,
        probe: BacklogProbe,
        close_probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._state = state
        self._probe = probe
        self._close_probe = close_probe
        self._interval = state.settings.sample_interval_seconds
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("BacklogSampler already started")
        self._thread = threading.Thread(target=self._run, name="pacs-backlog-sampler", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._sample_forever())

    async def _sample_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            while not self._stop.is_set():
                await self.sample_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=self._interval)
        finally:
            if self._close_probe is not None:
                await self._close_probe()

    async def sample_once(self) -> None:
        try:
            ready = await self._probe()
        except Exception as exc:
            log.warning("cannot read the ingest backlog: %r", exc)
            return
        self._state.observe_backlog(ready)

    def stop(self) -> None:
        """Stop sampling and join the thread; idempotent."""
        loop, stop, thread = self._loop, self._stop, self._thread
        self._thread = None
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout=10)


def start_backlog_sampler(state: Backpressure, broker: BrokerSettings) -> BacklogSampler | None:
    """A started sampler of the namespace's ingest queue (its own broker
    connection); None when no backlog limit applies."""
    if not state.settings.enabled or state.settings.max_ingest_backlog is None:
        return None
    probe = QueueDepthProbe(broker)
    sampler = BacklogSampler(state, probe, probe.close)
    sampler.start()
    return sampler
