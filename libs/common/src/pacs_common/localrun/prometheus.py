"""Prometheus beside the local system (``pacs run --prometheus``).

The same alert rules the deployments load (``deploy/observability/
prometheus/alerts.yaml``), evaluated against every local service's
``/metrics``, so dashboards' queries and alerts can be tried without a
cluster.  The generated configuration gives each target the labels
``service`` (dimse-gateway, ingest-worker…) and ``process`` (gateway-0…).
Prometheus itself is the Debian binary (``apt install prometheus``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from pacs_common.localrun.infra import LOCALHOST, find_free_port, port_is_free, tail_file

__all__ = [
    "DEFAULT_PROMETHEUS_PORT",
    "RULES_RELATIVE_PATH",
    "LocalPrometheus",
    "PrometheusError",
    "PrometheusOptions",
    "ScrapeTarget",
    "find_alert_rules",
    "render_config",
]

DEFAULT_PROMETHEUS_PORT = 9090
RULES_RELATIVE_PATH = Path("deploy/observability/prometheus/alerts.yaml")
_STOP_GRACE_SECONDS = 10.0


class PrometheusError(RuntimeError):
    """Prometheus could not be started (the message says why)."""


@dataclass(frozen=True)
class PrometheusOptions:
    """``port`` 0: any free port.  ``rule_files`` None: the repository's
    alert rules, found from ``search_from`` (or from this file) upwards."""

    port: int = DEFAULT_PROMETHEUS_PORT
    scrape_interval_seconds: float = 5.0
    evaluation_interval_seconds: float = 5.0
    rule_files: tuple[Path, ...] | None = None
    binary: str | None = None


@dataclass(frozen=True)
class ScrapeTarget:
    """One process's ``/metrics``: ``service`` is the service's name
    (dimse-gateway…), ``process`` the runner's name for it (gateway-0…)."""

    service: str
    process: str
    address: str


def find_alert_rules(*starts: Path) -> Path | None:
    """``deploy/observability/prometheus/alerts.yaml`` of the checkout that
    holds one of ``starts`` (or this module), searching upwards."""
    for start in (*starts, Path(__file__)):
        for directory in (start.absolute(), *start.absolute().parents):
            candidate = directory / RULES_RELATIVE_PATH
            if candidate.is_file():
                return candidate
    return None


def render_config(
    targets: Iterable[ScrapeTarget],
    rule_files: Sequence[Path],
    *,
    scrape_interval_seconds: float,
    evaluation_interval_seconds: float,
) -> str:
    """prometheus.yml, as JSON (a YAML subset Prometheus reads as well): one
    job per service, one target group per process."""
    jobs: dict[str, list[dict[str, object]]] = {}
    for target in targets:
        jobs.setdefault(target.service, []).append(
            {"targets": [target.address], "labels": {"service": target.service, "process": target.process}}
        )
    config = {
        "global": {
            "scrape_interval": _duration(scrape_interval_seconds),
            "scrape_timeout": _duration(min(scrape_interval_seconds, 10.0)),
            "evaluation_interval": _duration(evaluation_interval_seconds),
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": service, "metrics_path": "/metrics", "static_configs": groups}
            for service, groups in jobs.items()
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class LocalPrometheus:
    """One Prometheus process: configuration and TSDB under ``directory``,
    output to ``log_path``, listening on 127.0.0.1."""

    def __init__(
        self,
        options: PrometheusOptions,
        targets: Sequence[ScrapeTarget],
        directory: Path,
        log_path: Path,
        *,
        search_rules_from: Path | None = None,
    ) -> None:
        self.options = options
        self.targets = list(targets)
        self.directory = directory
        self.log_path = log_path
        self.port = options.port or find_free_port()
        self.rule_files = self._rule_files(options, search_rules_from)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "prometheus.yml"

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Prometheus, wait until it is ready."""
        binary = self.options.binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        if not os.access(binary, os.X_OK):
            raise PrometheusError(f"{binary} not found: install Prometheus (apt install prometheus)")
        if not port_is_free(self.port):
            raise PrometheusError(f"port {self.port} for Prometheus is in use; choose another")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            render_config(
                self.targets,
                self.rule_files,
                scrape_interval_seconds=self.options.scrape_interval_seconds,
                evaluation_interval_seconds=self.options.evaluation_interval_seconds,
            )
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address={LOCALHOST}:{self.port}",
                    "--web.enable-lifecycle",
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout)

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self._process = None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.alive():
                    code = self._process.returncode if self._process is not None else None
                    raise PrometheusError(
                        f"prometheus exited with code {code}; last lines of {self.log_path}:\n"
                        f"{tail_file(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/-/ready").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise PrometheusError(f"prometheus not ready after {timeout:g}s; see {self.log_path}")
                time.sleep(0.05)

    @staticmethod
    def _rule_files(options: PrometheusOptions, search_from: Path | None) -> tuple[Path, ...]:
        if options.rule_files is not None:
            return tuple(path.absolute() for path in options.rule_files)
        found = find_alert_rules(*([search_from] if search_from is not None else []))
        if found is None:
            raise PrometheusError(
                f"alert rules {RULES_RELATIVE_PATH} not found above {search_from or Path.cwd()}; "
                "pass rule_files"
            )
        return (found,)
