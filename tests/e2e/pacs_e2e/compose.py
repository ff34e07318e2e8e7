"""deploy/compose.yaml as a test fixture, through testcontainers' DockerCompose.

Only where a Docker engine answers (``docker_engine_problem`` says why not,
in about no time, so a module can skip before building anything).  The
stack gets a project name and free host ports of its own, so it does not
collide with a stack a developer already runs; ``docker compose down
--volumes`` removes it afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testcontainers.compose import ComposeContainer, DockerCompose

from pacs_common.localrun.infra import find_free_port, port_is_free

REPO = Path(__file__).resolve().parents[3]
DEPLOY_DIR = REPO / "deploy"
COMPOSE_FILE = "compose.yaml"
GATEWAY_SERVICE = "dimse-gateway"
DICOMWEB_SERVICE = "dicomweb-api"
DICOM_PORT_IN_CONTAINER = 11112
# Services that run once and exit (every other one must end up healthy).
ONE_SHOTS = frozenset({"migrate", "minio-init"})
DEFAULT_READY_TIMEOUT_SECONDS = 900.0
LOG_TAIL_CHARACTERS = 6000


class ComposeStackError(RuntimeError):
    """The stack did not come up (the message carries the compose logs)."""


def docker_engine_problem(timeout: float = 2.0) -> str | None:
    """Why the compose tests cannot run here, or None when they can."""
    try:
        # The docker SDK (a testcontainers dependency) ships no type information.
        docker = importlib.import_module("docker")
        docker.from_env(timeout=timeout).ping()
    except Exception as exc:  # any failure to reach the daemon means "no engine"
        return f"no Docker engine ({type(exc).__name__}: {exc})"
    try:
        subprocess.run(["docker", "compose", "version"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "no `docker compose` (Compose v2) command"
    return None


@dataclass(frozen=True)
class HostPorts:
    """Where the published ports of the stack are on this host."""

    dicom_first: int
    dicomweb: int
    prometheus: int
    grafana: int
    rabbitmq_management: int
    minio_console: int

    @classmethod
    def free(cls, gateway_replicas: int = 2) -> HostPorts:
        return cls(
            dicom_first=_free_port_run(gateway_replicas),
            dicomweb=find_free_port(),
            prometheus=find_free_port(),
            grafana=find_free_port(),
            rabbitmq_management=find_free_port(),
            minio_console=find_free_port(),
        )

    def env_file_text(self, project: str, gateway_replicas: int = 2) -> str:
        """The interpolation variables of compose.yaml (see its ``ports:``)."""
        values = {
            "COMPOSE_PROJECT_NAME": project,
            "DICOM_HOST_PORTS": f"{self.dicom_first}-{self.dicom_first + gateway_replicas - 1}",
            "DICOMWEB_HOST_PORT": str(self.dicomweb),
            "DICOMWEB_PUBLIC_BASE_URL": f"http://127.0.0.1:{self.dicomweb}",
            "PROMETHEUS_HOST_PORT": str(self.prometheus),
            "GRAFANA_HOST_PORT": str(self.grafana),
            "RABBITMQ_MANAGEMENT_HOST_PORT": str(self.rabbitmq_management),
            "MINIO_CONSOLE_HOST_PORT": str(self.minio_console),
        }
        return "".join(f"{key}={value}\n" for key, value in values.items())


def _free_port_run(length: int, attempts: int = 50) -> int:
    """The first of ``length`` consecutive free ports."""
    for _ in range(attempts):
        first = find_free_port()
        if first + length <= 65535 and all(port_is_free(first + i) for i in range(length)):
            return first
    raise ComposeStackError(f"no {length} consecutive free ports found")


@dataclass(frozen=True)
class ComposeStack:
    """The running stack: the DockerCompose handle and where to reach it."""

    compose: DockerCompose
    ports: HostPorts

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.dicomweb}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.prometheus}"

    @property
    def grafana_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.grafana}"

    def containers(self, service: str) -> list[ComposeContainer]:
        return [c for c in self.compose.get_containers() if c.Service == service]

    def gateway_ports(self) -> list[int]:
        """The host port of every dimse-gateway replica."""
        ports = {
            int(publisher.PublishedPort)
            for container in self.containers(GATEWAY_SERVICE)
            for publisher in container.Publishers
            if publisher.TargetPort == DICOM_PORT_IN_CONTAINER and publisher.PublishedPort
        }
        return sorted(ports)

    def run_in(self, service: str, *command: str) -> str:
        """Run a command in a service's container; its stdout (raises on failure)."""
        stdout, stderr, code = self.compose.exec_in_container(list(command), service)
        if code != 0:
            raise ComposeStackError(f"{' '.join(command)} in {service} exited {code}: {stderr}")
        return stdout

    def create_api_token(self, username: str, role: str) -> str:
        """A user with ``role`` and an API token (the dicomweb-api's own bootstrap command)."""
        cli = ("python", "-m", "dicomweb_api.security.cli")
        self.run_in(DICOMWEB_SERVICE, *cli, "user", "create", "--username", username, "--role", role)
        return self.run_in(
            DICOMWEB_SERVICE, *cli, "token", "create", "--user", username, "--name", "e2e"
        ).strip()

    def logs(self) -> str:
        with contextlib.suppress(subprocess.CalledProcessError):
            stdout, stderr = self.compose.get_logs()
            return (stdout + stderr)[-LOG_TAIL_CHARACTERS:]
        return "(no logs)"


def _not_up_yet(containers: list[ComposeContainer], expected: set[str]) -> list[str]:
    """What still keeps the stack from being up; raises when something failed."""
    waiting: list[str] = []
    seen = {c.Service for c in containers}
    waiting += [f"{service}: not created" for service in sorted(expected - seen)]
    for container in containers:
        service = str(container.Service)
        if service in ONE_SHOTS:
            if container.State == "exited" and container.ExitCode not in (0, None):
                raise ComposeStackError(f"{service} exited with {container.ExitCode}")
            if container.State != "exited":
                waiting.append(f"{service}: {container.State}")
        elif container.State in {"exited", "dead"}:
            raise ComposeStackError(
                f"{container.Name} stopped ({container.State}, exit {container.ExitCode})"
            )
        elif container.Health != "healthy":
            waiting.append(f"{container.Name}: {container.Health or container.State}")
    return waiting


def _wait_until_up(stack: ComposeStack, timeout: float) -> None:
    expected = set(stack.compose.get_config()["services"])
    deadline = time.monotonic() + timeout
    waiting = ["nothing checked yet"]
    while time.monotonic() < deadline:
        waiting = _not_up_yet(stack.compose.get_containers(include_all=True), expected)
        if not waiting:
            return
        time.sleep(2.0)
    raise ComposeStackError(f"not up after {timeout:g}s: {', '.join(waiting)}")


@contextlib.contextmanager
def running_compose_stack(
    work_dir: Path, *, ready_timeout: float = DEFAULT_READY_TIMEOUT_SECONDS
) -> Iterator[ComposeStack]:
    """Build the image, ``up`` the whole of deploy/compose.yaml, wait until
    every long-running container is healthy and every one-shot exited 0."""
    ports = HostPorts.free()
    env_file = work_dir / "compose.env"
    env_file.write_text(ports.env_file_text(f"pacs-e2e-{uuid.uuid4().hex[:8]}"))
    compose = DockerCompose(
        DEPLOY_DIR,
        compose_file_name=COMPOSE_FILE,
        build=True,
        wait=False,  # our own wait: `up --wait` trips over the one-shot containers
        env_file=str(env_file),
    )
    stack = ComposeStack(compose, ports)
    try:
        compose.start()
        try:
            _wait_until_up(stack, ready_timeout)
        except ComposeStackError as exc:
            raise ComposeStackError(f"{exc}\n--- compose logs (tail) ---\n{stack.logs()}") from exc
        yield stack
    finally:
        # After a failed build or start too: remove whatever was created.
        with contextlib.suppress(subprocess.CalledProcessError):
            compose.stop(down=True)
