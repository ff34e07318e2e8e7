"""An RFC 5424 syslog sender (UDP, or TCP with RFC 6587 octet counting) that
never blocks the event loop and never raises."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final, Literal

logger = logging.getLogger(__name__)

_TCP_TIMEOUT_SECONDS: Final = 2.0


class _Datagrams(asyncio.DatagramProtocol):
    def error_received(self, exc: Exception) -> None:
        logger.warning("audit syslog send failed", extra={"error": str(exc)})


class SyslogSender:
    """Sends syslog messages without blocking the event loop.

    UDP: one datagram per message.  TCP: RFC 6587 octet counting, one
    connection kept open and reopened after a failure.  Use it from one
    event loop only.
    """

    def __init__(self, host: str, port: int, protocol: Literal["udp", "tcp"]) -> None:
        self._host = host
        self._port = port
        self._protocol = protocol
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def send(self, message: bytes) -> bool:
        """True when handed to the network; failures are logged, never raised."""
        try:
            async with self._lock:
                if self._protocol == "udp":
                    await self._send_udp(message)
                else:
                    await asyncio.wait_for(self._send_tcp(message), _TCP_TIMEOUT_SECONDS)
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "audit syslog send failed",
                extra={"host": self._host, "port": self._port, "error": str(exc)},
            )
            await self._close_tcp()
            return False
        return True

    async def _send_udp(self, message: bytes) -> None:
        if self._udp is None or self._udp.is_closing():
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                _Datagrams, remote_addr=(self._host, self._port)
            )
        self._udp.sendto(message)

    async def _send_tcp(self, message: bytes) -> None:
        if self._tcp is None or self._tcp.is_closing():
            _, self._tcp = await asyncio.open_connection(self._host, self._port)
        self._tcp.write(b"%d " % len(message) + message)
        await self._tcp.drain()

    async def _close_tcp(self) -> None:
        writer, self._tcp = self._tcp, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await self._close_tcp()
