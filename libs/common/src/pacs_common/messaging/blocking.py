"""Confirmed publishing from plain threads (pynetdicom association threads).

pynetdicom calls its C-STORE handlers in one thread per association, and the
handler must not answer before the ingest message is confirmed.  Rather than
one connection per thread, one event loop in a daemon thread owns a robust
:class:`Broker`, and threads hand it work with ``run_coroutine_threadsafe``.
Every failure, including a timeout or a broker that is down, surfaces as
:class:`PublishError` in the calling thread within the timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass

from opentelemetry import context as otel_context
from pydantic import BaseModel

from pacs_common.messaging.broker import Broker, PublishError, build_message
from pacs_common.messaging.models import EVENT_ROUTING_KEYS, IngestMessage
from pacs_common.settings import BrokerSettings

log = logging.getLogger(__name__)

# Slack for the loop thread to pick the work up, on top of the publish timeout.
_HANDOFF_SECONDS = 1.0


@dataclass(frozen=True)
class _EventMessage:
    routing_key: str
    body: bytes
    message_id: str | None
    schema: str | None


class BlockingPublisher:
    """A thread-safe, blocking front to a :class:`Broker` on its own loop."""

    def __init__(self, settings: BrokerSettings, *, connect_timeout_seconds: float | None = None) -> None:
        self._settings = settings
        self._connect_timeout = connect_timeout_seconds or settings.publish_timeout_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    def start(self) -> None:
        """Start the loop thread and connect; raises PublishError when the
        first connection (and topology declaration) fails or times out."""
        if self._thread is not None:
            raise RuntimeError("BlockingPublisher already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, args=(loop,), name="pacs-amqp-publisher", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        future = asyncio.run_coroutine_threadsafe(self._connect(), loop)
        try:
            self._broker = future.result(timeout=self._connect_timeout + _HANDOFF_SECONDS)
        except BaseException as exc:
            future.cancel()
            self._stop_loop()
            raise PublishError(f"cannot connect to the broker: {exc!r}") from exc

    async def _connect(self) -> Broker:
        async with asyncio.timeout(self._connect_timeout):
            return await Broker.connect(self._settings)

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def publish_ingest(self, message: IngestMessage, timeout: float | None = None) -> None:
        """Publish and block until the broker confirmed; PublishError otherwise.

        ``timeout`` defaults to the settings' publish timeout.  The caller's
        OpenTelemetry context is carried over to the loop thread, so the
        message continues the caller's trace.
        """
        broker, loop = self._broker, self._loop
        if broker is None or loop is None or not loop.is_running():
            raise PublishError("publisher not started")
        if not broker.is_healthy():
            raise PublishError("not connected to the broker")
        wait = self._settings.publish_timeout_seconds if timeout is None else timeout
        caller_context = otel_context.get_current()
        coroutine = self._publish(broker, message, wait, caller_context)
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError as exc:  # the loop closed meanwhile (stop())
            coroutine.close()
            raise PublishError("publisher stopped") from exc
        try:
            future.result(timeout=wait + _HANDOFF_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PublishError(f"no confirm within {wait}s") from None
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(f"publish failed: {exc!r}") from exc

    @staticmethod
    async def _publish(
        broker: Broker, message: IngestMessage, wait: float, caller: otel_context.Context
    ) -> None:
        token = otel_context.attach(caller)
        try:
            async with asyncio.timeout(wait):
                await broker.publish_ingest(message)
        except TimeoutError:
            raise PublishError(f"no confirm within {wait}s") from None
        finally:
            otel_context.detach(token)

    def publish_event(self, event: BaseModel, timeout: float | None = None) -> None:
        """Publish an event (any model of ``EVENT_ROUTING_KEYS``) to the events
        exchange and block until the broker confirmed; PublishError otherwise."""
        future = self._submit_event(event, timeout)
        wait = self._settings.publish_timeout_seconds if timeout is None else timeout
        try:
            future.result(timeout=wait + _HANDOFF_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PublishError(f"no confirm within {wait}s") from None
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(f"publish failed: {exc!r}") from exc

    async def publish_event_async(self, event: BaseModel) -> None:
        """:meth:`publish_event` awaited from another event loop (e.g. inside a
        database transaction run by :class:`pacs_common.db.blocking.BlockingPool`),
        without blocking that loop; bounded by the publish timeout."""
        future = self._submit_event(event, None)
        try:
            await asyncio.wrap_future(future)
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(f"publish failed: {exc!r}") from exc

    def _submit_event(self, event: BaseModel, timeout: float | None) -> concurrent.futures.Future[None]:
        broker, loop = self._broker, self._loop
        if broker is None or loop is None or not loop.is_running():
            raise PublishError("publisher not started")
        if not broker.is_healthy():
            raise PublishError("not connected to the broker")
        routing_key = EVENT_ROUTING_KEYS.get(type(event))
        if routing_key is None:
            raise TypeError(f"{type(event).__name__} is not an event (no routing key)")
        wait = self._settings.publish_timeout_seconds if timeout is None else timeout
        body = event.model_dump_json(by_alias=True).encode()
        message_id = str(getattr(event, "message_id", "")) or None
        schema = getattr(event, "schema_", None)
        message = _EventMessage(routing_key, body, message_id, schema)
        coroutine = self._publish_event(broker, message, wait, otel_context.get_current())
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError as exc:  # the loop closed meanwhile (stop())
            coroutine.close()
            raise PublishError("publisher stopped") from exc

    @staticmethod
    async def _publish_event(
        broker: Broker, event: _EventMessage, wait: float, caller: otel_context.Context
    ) -> None:
        token = otel_context.attach(caller)
        try:
            async with asyncio.timeout(wait):
                # Built here so the message carries the caller's trace context.
                message = build_message(event.body, message_id=event.message_id, schema=event.schema)
                await broker.publish_raw(broker.topology.events_exchange, event.routing_key, message)
        except TimeoutError:
            raise PublishError(f"no confirm within {wait}s") from None
        finally:
            otel_context.detach(token)

    def is_healthy(self) -> bool:
        broker, loop = self._broker, self._loop
        return broker is not None and loop is not None and loop.is_running() and broker.is_healthy()

    def stop(self) -> None:
        """Close the connection, stop the loop and join its thread; idempotent."""
        broker, loop = self._broker, self._loop
        self._broker = None
        if broker is not None and loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(broker.close(), loop)
            try:
                future.result(timeout=self._connect_timeout + _HANDOFF_SECONDS)
            except Exception:
                log.warning("closing the broker connection failed", exc_info=True)
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
