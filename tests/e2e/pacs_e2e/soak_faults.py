"""Restarting one dependency at a time while the soak's clients run.

The hot tier lives on an Azurite that keeps its blobs on disk (not the
in-memory one of the other tests), so a restart of the object store keeps
every object written before it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from pacs_common.localrun.runner import LocalSystem
from pacs_common.testing.storage_servers import (
    AZURITE_ACCOUNT,
    find_azurite_bin,
    free_port,
    make_azurite_connection_string,
)

FAULT_KINDS: tuple[str, ...] = ("rabbitmq", "postgres", "worker", "gateway", "objectstore")
# How long a killed service process stays down before it is started again.
DOWN_SECONDS = 1.0
_AZURITE_START_TIMEOUT = 30.0


class PersistentAzurite:
    """``azurite-blob`` with ``--location`` on disk: stop/start keep the blobs."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.blob_endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        self.connection_string = make_azurite_connection_string(self.blob_endpoint)
        self.log_path = root / "azurite.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        command = [
            str(find_azurite_bin()),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(self.root / "data"),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        self._process = subprocess.Popen(
            command,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_answering()

    def stop(self) -> None:
        """SIGTERM (Azurite saves its metadata and exits), SIGKILL after 20 s."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_answering(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + _AZURITE_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"azurite exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.blob_endpoint, timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer: it is serving
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"azurite did not answer within {_AZURITE_START_TIMEOUT}s; see {self.log_path}")


class _Restartable(Protocol):
    def restart(self) -> None: ...


def _restart_server(server: _Restartable, name: str) -> str:
    server.restart()
    return name


@dataclass(frozen=True)
class Restart:
    what: str
    began: float  # time.monotonic()
    seconds: float
    error: str | None = None


@dataclass
class FaultScheduler:
    """Restarts one dependency at a time, ``interval`` seconds after the
    previous one came back, cycling through ``kinds`` (order shuffled by
    ``rng``), until :meth:`stop`."""

    system: LocalSystem
    objectstore: PersistentAzurite
    kinds: Sequence[str]
    interval: float
    rng: random.Random
    restarts: list[Restart] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _turn: int = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask to stop; wait until every kind was restarted at least once and
        the restart in progress is complete."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        order = list(self.kinds)
        self.rng.shuffle(order)
        while order:
            if not self._stop.is_set():
                self._stop.wait(self.interval)
            else:
                time.sleep(min(self.interval, DOWN_SECONDS))  # finishing the cycle: let it recover
            if self._stop.is_set() and len(self.restarts) >= len(order):
                return
            kind = order[len(self.restarts) % len(order)]
            self.restarts.append(self._restart(kind))

    def _restart(self, kind: str) -> Restart:
        action = self._action(kind)
        started = time.monotonic()
        try:
            what = action()
        except Exception as exc:
            return Restart(kind, started, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
        return Restart(what, started, time.monotonic() - started)

    def _action(self, kind: str) -> Callable[[], str]:
        system = self.system
        self._turn += 1
        server: _Restartable | None = {
            "rabbitmq": system.rabbitmq,
            "postgres": system.postgres,
            "objectstore": self.objectstore,
        }.get(kind)
        if server is not None:
            return lambda: _restart_server(server, kind)
        if kind in ("worker", "gateway"):
            services = system.workers if kind == "worker" else system.gateways
            name = services[self._turn % len(services)].name
            return lambda: self._bounce(name)
        raise ValueError(f"cannot restart {kind!r} in this system")

    def _bounce(self, name: str) -> str:
        self.system.kill_service(name, signal.SIGKILL)
        time.sleep(DOWN_SECONDS)
        self.system.start_service(name)
        return name
