"""The whole PACS as local processes: ``pacs run`` and the end-to-end tests.

Why a runner of our own: the development machines have no container engine,
and the e2e/fault tests need the real services as separate processes (so a
worker can be SIGKILLed mid-send) against servers they control.

:class:`LocalSystem` picks PostgreSQL and RabbitMQ (the configured ones when
they answer, throwaway ones under ``<project>/.pacs/infra`` otherwise),
applies migrations, starts the gateway and worker processes (each in its own
session, so a Ctrl-C at the terminal reaches only the runner, which then
stops them in order), waits until each reports ready, and records what runs
in ``<project>/.pacs/run/state.json`` for ``pacs status``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import datetime as dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO, TypedDict, TypeVar

import httpx

from pacs_common.localrun.infra import (
    LOCALHOST,
    InfraError,
    ThrowawayPostgres,
    ThrowawayRabbitMQ,
    ensure_database,
    find_free_port,
    pid_alive,
    port_is_free,
    probe_postgres,
    probe_rabbitmq,
    redact_url,
    run_sync,
    tail_file,
    tcp_port_open,
)
from pacs_common.localrun.prometheus import LocalPrometheus, PrometheusError, PrometheusOptions, ScrapeTarget
from pacs_common.settings import DatabaseSettings

T = TypeVar("T")

DEFAULT_DICOM_PORT = 11112
DEFAULT_HTTP_PORT_BASE = 8081
DEFAULT_DICOMWEB_PORT = 8080
# Every service finishes its in-flight work within PACS_SHUTDOWN_GRACE_SECONDS
# (25 s by default) of SIGTERM; the runner waits a little longer before SIGKILL.
DEFAULT_STOP_GRACE_SECONDS = 30.0
DEFAULT_READY_TIMEOUT_SECONDS = 90.0


class LocalRunError(RuntimeError):
    """The local system could not be started (the message says why)."""


class StartInterruptedError(LocalRunError):
    """A stop was requested (Ctrl-C, SIGTERM) while the system was starting."""


@dataclass(frozen=True)
class ServiceKind:
    """A service the runner knows how to start: ``python -m <module>``, with
    its HTTP (health/metrics) port in the ``http_port_env`` variable."""

    key: str
    label: str
    module: str
    http_port_env: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None and (
            importlib.util.find_spec(f"{self.module}.__main__") is not None
        )


GATEWAY = ServiceKind("gateway", "dimse-gateway", "dimse_gateway", "PACS_GATEWAY_HTTP_PORT")
WORKER = ServiceKind("worker", "ingest-worker", "ingest_worker", "PACS_WORKER_HTTP_PORT")
QUERY = ServiceKind("query", "query-service", "query_service", "PACS_QUERY_HTTP_PORT")
DICOMWEB = ServiceKind("dicomweb", "dicomweb-api", "dicomweb_api", "PACS_DICOMWEB_HTTP_PORT")
HSM = ServiceKind("hsm", "hsm-migrator", "hsm_migrator", "PACS_HSM_HTTP_PORT")
PREFETCH = ServiceKind("prefetch", "prefetch-scheduler", "prefetch_scheduler", "PACS_PREFETCH_HTTP_PORT")
AI = ServiceKind("ai", "ai-connector", "ai_connector", "PACS_AI_HTTP_PORT")
# Front doors first: on the way down they stop taking work before workers go;
# the background services next, then the ingest worker; the query-service
# last, since the others query it until they stop.
SERVICE_KINDS: tuple[ServiceKind, ...] = (GATEWAY, DICOMWEB, HSM, PREFETCH, AI, WORKER, QUERY)
# HTTP ports count up from the base in this order, so that the ports of the
# front doors and the worker stay where they were before the background
# services came (gateway 8081, worker 8082, query-service 8083, then
# prefetch-scheduler 8084, hsm-migrator 8085, ai-connector 8086 — their
# defaults when run on their own).
_PORT_ORDER: tuple[ServiceKind, ...] = (GATEWAY, WORKER, QUERY, PREFETCH, HSM, AI)


@dataclass
class ServiceProcess:
    """One running (or stopped) service process."""

    kind: ServiceKind
    index: int
    http_port: int
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    exit_reported: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind.key}-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def base_url(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def ready_url(self) -> str:
        return f"{self.base_url}/health/ready"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"


class ServiceState(TypedDict):
    name: str
    kind: str
    pid: int | None
    http_port: int
    health_url: str
    metrics_url: str
    log: str


class RunState(TypedDict):
    """What ``.pacs/run/state.json`` holds (URLs with credentials: mode 0600)."""

    runner_pid: int
    started_at: str
    project_dir: str
    database_url: str
    broker_url: str
    namespace: str
    storage_path: str
    dicom: dict[str, Any]
    services: list[ServiceState]
    throwaway: list[str]


def state_path(project_dir: Path) -> Path:
    return project_dir / ".pacs" / "run" / "state.json"


def load_state(project_dir: Path) -> RunState | None:
    """The state of the local system running in ``project_dir``, or None when
    none runs (no file, or a file left by a runner that is gone)."""
    try:
        state: RunState = json.loads(state_path(project_dir).read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("runner_pid")
    return state if isinstance(pid, int) and pid_alive(pid) else None


def load_migrations() -> tuple[Callable[[DatabaseSettings], None], Callable[[DatabaseSettings], str | None]]:
    """``upgrade`` and ``current_revision`` of the migration module, imported
    when needed (it pulls in alembic and SQLAlchemy)."""
    try:
        from pacs_common.db.migrate import current_revision, upgrade
    except ImportError as exc:
        raise LocalRunError(f"migrations unavailable: {exc}") from exc
    return upgrade, current_revision


def call_in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` on a fresh thread: migration code may run an event
    loop of its own, which fails on a thread (a test's) that already has one."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function, *args).result()


class LocalSystem:
    """The PACS services as local processes, plus the infrastructure they need.

    ``database_url`` / ``broker_url``: use exactly these (an error if they do
    not answer); when None, the configured ones (``PACS_DB_URL``,
    ``PACS_AMQP_URL`` or the defaults) if they answer, otherwise throwaway
    servers.  ``throwaway_infra=True`` always starts throwaway servers
    (exposed as :attr:`postgres` and :attr:`rabbitmq`, so a test can restart
    them) and deletes them on stop unless ``keep_infra_data``.

    Ports: every gateway listens on ``gateway_port`` (SO_REUSEPORT); each
    process gets its own health/metrics port, counting up from
    ``http_port_base`` in :data:`SERVICE_KINDS` order, except the
    dicomweb-api, which listens on ``PACS_DICOMWEB_HTTP_PORT`` (8080); with
    ``http_port_base`` 0 every port is a free one.
    ``env`` is empty until :meth:`start`.  Environment precedence for the
    services: ``extra_env`` > constructor arguments > the caller's
    environment > the runner's defaults.
    """

    def __init__(
        self,
        project_dir: Path | str | None = None,
        *,
        gateways: int = 1,
        workers: int = 1,
        query_services: int = 1,
        dicomweb_services: int = 1,
        hsm_migrators: int = 1,
        prefetch_schedulers: int = 1,
        ai_connectors: int = 1,
        database_url: str | None = None,
        broker_url: str | None = None,
        namespace: str | None = None,
        data_dir: Path | str | None = None,
        gateway_port: int | None = None,
        http_port_base: int | None = None,
        ae_title: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        throwaway_infra: bool = False,
        keep_infra_data: bool | None = None,
        migrate: bool = True,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_SECONDS,
        stop_grace: float = DEFAULT_STOP_GRACE_SECONDS,
        out: TextIO | None = sys.stdout,
        prometheus: PrometheusOptions | None = None,
    ) -> None:
        counts = (gateways, workers, query_services, dicomweb_services, hsm_migrators, prefetch_schedulers)
        if min(*counts, ai_connectors) < 0:
            raise ValueError("service counts must be >= 0")
        self.project_dir = Path(project_dir or Path.cwd()).absolute()
        self.pacs_dir = self.project_dir / ".pacs"
        self.infra_dir = self.pacs_dir / "infra"
        self.log_dir = self.pacs_dir / "logs"
        self.counts = {
            GATEWAY.key: gateways,
            WORKER.key: workers,
            QUERY.key: query_services,
            DICOMWEB.key: dicomweb_services,
            HSM.key: hsm_migrators,
            PREFETCH.key: prefetch_schedulers,
            AI.key: ai_connectors,
        }
        self._database_url_arg = database_url
        self._broker_url_arg = broker_url
        environ = os.environ
        self.namespace = namespace if namespace is not None else environ.get("PACS_AMQP_NAMESPACE", "")
        self.data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self.ae_title = ae_title or environ.get("PACS_GATEWAY_AE_TITLE", "PACS")
        port = gateway_port if gateway_port is not None else _env_int("PACS_GATEWAY_PORT", DEFAULT_DICOM_PORT)
        self.gateway_port = port or find_free_port()
        self.gateway_host = environ.get("PACS_GATEWAY_HOST", "0.0.0.0")
        base = (
            http_port_base
            if http_port_base is not None
            else _env_int("PACS_GATEWAY_HTTP_PORT", DEFAULT_HTTP_PORT_BASE)
        )
        self._http_port_base = base
        self._dicomweb_port = _env_int("PACS_DICOMWEB_HTTP_PORT", DEFAULT_DICOMWEB_PORT)
        self.extra_env = dict(extra_env or {})
        self.throwaway_infra = throwaway_infra
        # A fallback server for `pacs run` keeps its data (the index must match
        # the stored files next time); forced throwaway servers are for tests.
        self.keep_infra_data = not throwaway_infra if keep_infra_data is None else keep_infra_data
        self.migrate = migrate
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self._out = out
        self.postgres: ThrowawayPostgres | None = None
        self.rabbitmq: ThrowawayRabbitMQ | None = None
        self.database_url = ""
        self.broker_url = ""
        self.revision: str | None = None
        self.services: list[ServiceProcess] = []
        self.prometheus_options = prometheus
        # Started after the services when ``prometheus`` is given (pacs run --prometheus).
        self.prometheus: LocalPrometheus | None = None
        self._env: dict[str, str] = {}
        self._cancel = threading.Event()
        self._lock = threading.RLock()
        self._started = False
        self._infra_reported = False

    # -- public API ----------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment every service got (minus its own HTTP port and
        instance name); handy for running ``pacs`` commands against the system."""
        return dict(self._env)

    @property
    def storage_path(self) -> Path:
        return Path(self._env.get("PACS_STORAGE_HOT_PATH", "data/hot"))

    @property
    def gateways(self) -> list[ServiceProcess]:
        return [s for s in self.services if s.kind is GATEWAY]

    @property
    def workers(self) -> list[ServiceProcess]:
        return [s for s in self.services if s.kind is WORKER]

    @property
    def query_services(self) -> list[ServiceProcess]:
        return [s for s in self.services if s.kind is QUERY]

    @property
    def dicomweb_services(self) -> list[ServiceProcess]:
        return [s for s in self.services if s.kind is DICOMWEB]

    def start(self) -> None:
        """Bring everything up and wait until every service is ready.  On any
        failure, whatever was started is stopped again before raising."""
        with self._lock:
            if self._started:
                raise LocalRunError("already started")
            self._started = True
            self._cancel.clear()
        atexit.register(self.stop)
        try:
            self._refuse_second_runner()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._choose_infra()
            if self.migrate:
                self._apply_migrations()
            self._env = self._build_env()
            self.services = self._plan_services()
            self._check_ports()
            for service in self.services:
                self._spawn(service, fresh_log=True)
            # Prometheus discovers its targets while the services start.
            self._start_prometheus()
            self._wait_ready(self.services)
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every service (gateways first), SIGKILL what is still there
        after the grace period, stop throwaway servers we started, remove the
        state file.  Safe to call twice and from an atexit hook."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            self._cancel.set()
        atexit.unregister(self.stop)
        if self.prometheus is not None:
            self.prometheus.stop()
        for kind in SERVICE_KINDS:
            self._terminate([s for s in self.services if s.kind is kind and s.alive()])
        for server in (self.rabbitmq, self.postgres):
            if server is not None:
                try:
                    if self.keep_infra_data:
                        server.stop()
                    else:
                        server.remove()
                except (InfraError, OSError) as exc:
                    self._say(f"could not stop {server!r}: {exc}")
        state = state_path(self.project_dir)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text()).get("runner_pid") == os.getpid():
                state.unlink()

    def run(self) -> int:
        """``pacs run``: start, print the endpoints, stay in the foreground
        reporting (not restarting) services that die, stop on SIGINT/SIGTERM/SIGHUP."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

        def request_stop(signum: int, frame: FrameType | None) -> None:
            self._cancel.set()

        previous = {signum: signal.signal(signum, request_stop) for signum in handled}
        try:
            try:
                self.start()
            except StartInterruptedError:
                self._say("interrupted while starting")
                return 0
            self._say(self.describe())
            while not self._cancel.wait(0.5):
                self._report_deaths()
            self._say("stopping…")
            return 0
        finally:
            self.stop()
            self._say("stopped")
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def kill_service(self, name: str, sig: int = signal.SIGKILL, *, wait: bool = True) -> None:
        """Send ``sig`` to one service's process group (``worker-0``…); with
        ``wait``, return only once it has exited."""
        service = self._service(name)
        if not service.alive() or service.process is None:
            raise LocalRunError(f"{name} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, sig)
        service.exit_reported = True  # expected; the foreground loop stays quiet
        if wait:
            try:
                service.process.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                raise LocalRunError(f"{name} did not exit after signal {sig}") from None

    def start_service(self, name: str) -> None:
        """Start a stopped service again on the same ports; wait until ready."""
        service = self._service(name)
        if service.alive():
            raise LocalRunError(f"{name} is already running (pid {service.pid})")
        self._spawn(service, fresh_log=False)
        self._wait_ready([service])
        self._write_state()

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.kill_service(f"{WORKER.key}-{index}", sig)

    def start_worker(self, index: int) -> None:
        self.start_service(f"{WORKER.key}-{index}")

    def kill_gateway(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.kill_service(f"{GATEWAY.key}-{index}", sig)

    def start_gateway(self, index: int) -> None:
        self.start_service(f"{GATEWAY.key}-{index}")

    def describe(self) -> str:
        """The endpoints, for humans (passwords redacted)."""
        shown_host = LOCALHOST if self.gateway_host in ("0.0.0.0", "") else self.gateway_host
        n_gateways = len(self.gateways)
        lines = [
            "PACS is running — Ctrl-C stops it.",
            f"  DICOM     AE title {self.ae_title!r} on {self.gateway_host}:{self.gateway_port}"
            f" ({n_gateways} gateway process{'es' if n_gateways != 1 else ''})",
            f"            try: echoscu -aec {self.ae_title} {shown_host} {self.gateway_port}",
        ]
        for web in self.dicomweb_services[:1]:
            lines += [
                f"  DICOMweb  {web.base_url}/dicom-web   REST {web.base_url}/api/v1   docs {web.base_url}/docs",
                "            needs a token: python -m dicomweb_api.security.cli --help",
            ]
        for service in self.services:
            lines.append(
                f"  {service.name:<9} pid {service.pid}  {service.ready_url}  "
                f"{service.metrics_url}  log {self._relative(service.log_path)}"
            )
        if self.prometheus is not None:
            lines.append(
                f"  prometheus {self.prometheus.url}  rules {', '.join(map(str, self.prometheus.rule_files))}"
            )
        backend = self._env.get("PACS_STORAGE_HOT_BACKEND", "filesystem")
        where = self.storage_path if backend == "filesystem" else "(see PACS_STORAGE_HOT_*)"
        lines += [
            f"  storage   {backend} {where}",
            f"  database  {redact_url(self.database_url)}{self._origin(self.postgres)}",
            f"  broker    {redact_url(self.broker_url)}{self._origin(self.rabbitmq)}"
            + (f" namespace {self.namespace!r}" if self.namespace else ""),
            f"  state     {self._relative(state_path(self.project_dir))} (pacs status)",
        ]
        return "\n".join(lines)

    def __enter__(self) -> LocalSystem:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- infrastructure ------------------------------------------------------

    def _choose_infra(self) -> None:
        self.database_url = self._choose(
            "PostgreSQL",
            self._database_url_arg,
            _configured_database_url,
            probe_postgres,
            self._start_postgres,
        )
        self.broker_url = self._choose(
            "RabbitMQ",
            self._broker_url_arg,
            _configured_broker_url,
            probe_rabbitmq,
            self._start_rabbitmq,
        )

    def _choose(
        self,
        what: str,
        explicit: str | None,
        configured: Callable[[], str],
        probe: Callable[[str], Awaitable[str | None]],
        start_throwaway: Callable[[], str],
    ) -> str:
        if self.throwaway_infra:
            return start_throwaway()
        url = explicit if explicit is not None else configured()
        problem: str | None = run_sync(lambda: probe(url))
        if problem is None:
            self._say(f"{what}: using {redact_url(url)}")
            return url
        if explicit is not None:
            raise LocalRunError(f"{what} at {redact_url(url)} unreachable: {problem}")
        self._say(f"{what}: {redact_url(url)} unreachable ({problem}); starting a throwaway one")
        return start_throwaway()

    def _start_postgres(self) -> str:
        started = time.monotonic()
        self.postgres = ThrowawayPostgres(self.infra_dir)
        self._start_server(self.postgres)
        self._say(
            f"PostgreSQL: throwaway server on {LOCALHOST}:{self.postgres.port}, data in "
            f"{self._relative(self.postgres.root)} ({time.monotonic() - started:.1f}s)"
        )
        return self.postgres.url

    def _start_rabbitmq(self) -> str:
        started = time.monotonic()
        self.rabbitmq = ThrowawayRabbitMQ(self.infra_dir)
        self._start_server(self.rabbitmq)
        self._say(
            f"RabbitMQ: throwaway node {self.rabbitmq.nodename} on {LOCALHOST}:{self.rabbitmq.port}"
            f", data in {self._relative(self.rabbitmq.root)} ({time.monotonic() - started:.1f}s)"
        )
        return self.rabbitmq.url

    @staticmethod
    def _start_server(server: ThrowawayPostgres | ThrowawayRabbitMQ) -> None:
        try:
            server.start()
        except InfraError as exc:
            raise LocalRunError(str(exc)) from exc

    def _apply_migrations(self) -> None:
        upgrade, current_revision = load_migrations()
        if ensure_database(self.database_url):
            self._say(f"created database {redact_url(self.database_url)}")
        settings = DatabaseSettings(url=self.database_url)
        call_in_thread(upgrade, settings)
        self.revision = call_in_thread(current_revision, settings)
        self._say(f"database schema at revision {self.revision}")

    # -- services ------------------------------------------------------------

    def _build_env(self) -> dict[str, str]:
        env = dict(os.environ)
        data_dir = self.data_dir
        if data_dir is None and "PACS_STORAGE_HOT_PATH" not in env:
            data_dir = self.project_dir / "data"
        defaults = {
            "PACS_TELEMETRY_LOG_FORMAT": "text",
            "PACS_GATEWAY_HTTP_HOST": LOCALHOST,
            "PACS_WORKER_HTTP_HOST": LOCALHOST,
            "PACS_QUERY_HTTP_HOST": LOCALHOST,
            "PACS_DICOMWEB_HTTP_HOST": LOCALHOST,
            "PACS_HSM_HTTP_HOST": LOCALHOST,
            "PACS_PREFETCH_HTTP_HOST": LOCALHOST,
            "PACS_AI_HTTP_HOST": LOCALHOST,
        }
        for key, value in defaults.items():
            env.setdefault(key, value)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PACS_DB_URL": self.database_url,
                "PACS_AMQP_URL": self.broker_url,
                "PACS_AMQP_NAMESPACE": self.namespace,
                "PACS_GATEWAY_PORT": str(self.gateway_port),
                "PACS_GATEWAY_AE_TITLE": self.ae_title,
            }
        )
        if data_dir is not None:
            env["PACS_STORAGE_HOT_PATH"] = str(data_dir / "hot")
            env["PACS_GATEWAY_SPOOL_DIR"] = str(data_dir / "spool")
            env["PACS_DICOMWEB_SPOOL_DIR"] = str(data_dir / "spool")
            env["PACS_AI_SPOOL_DIR"] = str(data_dir / "spool")
        env.update(self.extra_env)
        return env

    def _plan_services(self) -> list[ServiceProcess]:
        services: list[ServiceProcess] = []
        installed = {kind.key for kind in SERVICE_KINDS if kind.installed()}
        ports: dict[str, list[int]] = {}
        port = self._http_port_base
        for kind in _PORT_ORDER:
            count = self.counts.get(kind.key, 1) if kind.key in installed else 0
            ports[kind.key] = list(range(port, port + count)) if port else []
            port = port + count if port else 0
        if self._http_port_base:
            # The HTTP API users and viewers reach: its own well-known port.
            ports[DICOMWEB.key] = [self._dicomweb_port + i for i in range(self.counts.get(DICOMWEB.key, 1))]
        for kind in SERVICE_KINDS:
            count = self.counts.get(kind.key, 1)
            if count and kind.key not in installed:
                self._say(f"{kind.label}: not installed (no module {kind.module}); skipped")
                continue
            for index in range(count):
                planned = ports.get(kind.key, [])
                http_port = planned[index] if index < len(planned) else find_free_port()
                name = f"{kind.key}-{index}"
                env = {
                    **self._env,
                    kind.http_port_env: str(http_port),
                    "PACS_TELEMETRY_SERVICE_INSTANCE": name,
                }
                if kind is DICOMWEB and "PACS_DICOMWEB_PUBLIC_BASE_URL" not in self.extra_env:
                    # Links in responses (RetrieveURL, BulkDataURI) must carry the
                    # port even for clients that send Host without it.
                    env["PACS_DICOMWEB_PUBLIC_BASE_URL"] = f"http://{LOCALHOST}:{http_port}"
                log_path = self.log_dir / f"{name}.log"
                services.append(ServiceProcess(kind, index, http_port, log_path, env))
        # Gateways and dicomweb-api reach the (first) query-service unless told otherwise.
        query = next((s for s in services if s.kind is QUERY), None)
        for variable in ("PACS_GATEWAY_QUERY_URL", "PACS_DICOMWEB_QUERY_URL"):
            if query is not None and variable not in self.extra_env:
                for service in services:
                    service.env[variable] = query.base_url
        # The ai-connector hands inference services the DICOMweb URLs of a
        # study: those of the (first) dicomweb-api.
        dicomweb = next((s for s in services if s.kind is DICOMWEB), None)
        if dicomweb is not None and "PACS_AI_DICOMWEB_URL" not in self.extra_env:
            for service in services:
                service.env["PACS_AI_DICOMWEB_URL"] = dicomweb.base_url
        return services

    def _check_ports(self) -> None:
        if self.gateways and tcp_port_open(LOCALHOST, self.gateway_port):
            raise LocalRunError(
                f"DICOM port {self.gateway_port} is already in use (another PACS?); "
                "choose another with --port / PACS_GATEWAY_PORT"
            )
        for service in self.services:
            if not port_is_free(service.http_port):
                raise LocalRunError(
                    f"HTTP port {service.http_port} for {service.name} is in use; "
                    "choose another base with --http-port-base"
                )

    def _spawn(self, service: ServiceProcess, *, fresh_log: bool) -> None:
        """Start one service in a session of its own, output to its log file."""
        with service.log_path.open("wb" if fresh_log else "ab") as log:
            if not fresh_log:
                log.write(f"\n--- restarted by the runner at {_now()} ---\n".encode())
                log.flush()
            service.process = subprocess.Popen(
                [sys.executable, "-m", service.kind.module],
                cwd=self.project_dir,
                env=service.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service.exit_reported = False

    def _wait_ready(self, services: list[ServiceProcess]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(services)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for service in list(pending):
                    if not service.alive():
                        raise LocalRunError(
                            f"{service.name} exited with code {service.returncode} while "
                            f"starting; last lines of {service.log_path}:\n"
                            f"{tail_file(service.log_path)}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(service.ready_url).status_code == 200:
                            pending.remove(service)
                if not pending:
                    return
                if self._cancel.is_set():
                    raise StartInterruptedError("stop requested while starting")
                if time.monotonic() > deadline:
                    first = pending[0]
                    raise LocalRunError(
                        f"{', '.join(s.name for s in pending)} not ready after "
                        f"{self.ready_timeout:g}s ({first.ready_url}); last lines of "
                        f"{first.log_path}:\n{tail_file(first.log_path)}"
                    )
                time.sleep(0.1)

    def _terminate(self, services: list[ServiceProcess]) -> None:
        for service in services:
            if service.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for service in services:
            process = service.process
            if process is None:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"{service.name} still running after {self.stop_grace:g}s; SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            service.exit_reported = True

    def _report_deaths(self) -> None:
        for service in self.services:
            if service.exit_reported or service.alive():
                continue
            service.exit_reported = True
            self._say(
                f"{service.name} (pid {service.pid}) exited with code {service.returncode}; "
                f"not restarted. Last lines of {self._relative(service.log_path)}:\n"
                f"{tail_file(service.log_path, 10)}"
            )
        for server in (self.postgres, self.rabbitmq):
            if server is not None and not server.is_running() and not self._infra_reported:
                self._infra_reported = True
                self._say(f"{server!r} is no longer running; see {server.log_file}")

    def _service(self, name: str) -> ServiceProcess:
        for service in self.services:
            if service.name == name:
                return service
        known = ", ".join(s.name for s in self.services) or "none"
        raise LocalRunError(f"no service {name!r} (known: {known})")

    def _start_prometheus(self) -> None:
        if self.prometheus_options is None:
            return
        targets = [ScrapeTarget(s.kind.label, s.name, f"{LOCALHOST}:{s.http_port}") for s in self.services]
        self.prometheus = LocalPrometheus(
            self.prometheus_options,
            targets,
            self.pacs_dir / "prometheus",
            self.log_dir / "prometheus.log",
            search_rules_from=self.project_dir,
        )
        try:
            self.prometheus.start()
        except PrometheusError as exc:
            raise LocalRunError(str(exc)) from exc
        self._say(f"Prometheus: {self.prometheus.url} scraping {len(targets)} processes")

    # -- state -----------------------------------------------------------------

    def _refuse_second_runner(self) -> None:
        state = load_state(self.project_dir)
        if state is not None and state["runner_pid"] != os.getpid():
            raise LocalRunError(
                f"a local PACS already runs in {self.project_dir} (runner pid "
                f"{state['runner_pid']}); stop it first or use another directory"
            )

    def _write_state(self) -> None:
        state: RunState = {
            "runner_pid": os.getpid(),
            "started_at": _now(),
            "project_dir": str(self.project_dir),
            "database_url": self.database_url,
            "broker_url": self.broker_url,
            "namespace": self.namespace,
            "storage_path": str(self.storage_path),
            "dicom": {"ae_title": self.ae_title, "host": self.gateway_host, "port": self.gateway_port},
            "services": [
                {
                    "name": s.name,
                    "kind": s.kind.key,
                    "pid": s.pid,
                    "http_port": s.http_port,
                    "health_url": s.ready_url,
                    "metrics_url": s.metrics_url,
                    "log": str(s.log_path),
                }
                for s in self.services
            ],
            "throwaway": [repr(s) for s in (self.postgres, self.rabbitmq) if s is not None],
        }
        path = state_path(self.project_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=2)
        temporary.replace(path)

    # -- output ----------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self._out is not None:
            print(message, file=self._out, flush=True)

    def _relative(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(self.project_dir))
        return str(path)

    @staticmethod
    def _origin(server: ThrowawayPostgres | ThrowawayRabbitMQ | None) -> str:
        return " (throwaway)" if server is not None else ""


def _configured_database_url() -> str:
    return DatabaseSettings().url


def _configured_broker_url() -> str:
    from pacs_common.settings import BrokerSettings

    return BrokerSettings().url.get_secret_value()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise LocalRunError(f"{name}={value!r} is not a port number") from None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
