"""deploy/compose.yaml without a Docker engine: the compose schema, Debian's
docker-compose 1.29, and what would break ``docker compose up`` at run time
(a setting name the services never read, a command that does not exist, a
start-up order that waits for a container that never becomes healthy, a
Prometheus that scrapes the wrong port, a Grafana that provisions nothing)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pacs_common.cli.main import build_parser
from pacs_common.localrun.runner import SERVICE_KINDS, ServiceKind
from pacs_common.settings import StorageTierSettings, StorageTiersSettings
from pacs_common.settings_catalog import environment_variables, is_known_environment_variable
from pacs_common.shutdown import ShutdownSettings

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
PROMETHEUS_CONFIG = DEPLOY / "compose" / "prometheus.yml"
GRAFANA_PROVISIONING = DEPLOY / "compose" / "grafana" / "provisioning"
DASHBOARDS = DEPLOY / "observability" / "dashboards"
HEALTHCHECK_SCRIPT = DEPLOY / "docker" / "healthcheck.py"
DOCKER_COMPOSE_1 = Path("/usr/bin/docker-compose")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
_INTERPOLATION_DEFAULT = re.compile(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}")
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

Service = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    found: dict[str, Service] = compose["services"]
    return found


@pytest.fixture(scope="module")
def catalog() -> dict[str, str]:
    """Every variable the PACS reads → its settings class (imports every module of the PACS)."""
    return environment_variables()


def _environment(service: Service) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {str(key): str(value) for key, value in raw.items()}


def _command(service: Service) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _kind_of(service: Service) -> ServiceKind | None:
    """The PACS service a compose service runs (``python -m <module>``), if any."""
    command = _command(service)
    if command[:2] != ["python", "-m"]:
        return None
    return next((kind for kind in SERVICE_KINDS if kind.module == command[2]), None)


def _pacs_services(services: Mapping[str, Service]) -> dict[str, ServiceKind]:
    found = {name: _kind_of(service) for name, service in services.items()}
    return {name: kind for name, kind in found.items() if kind is not None}


def _is_one_shot(service: Service) -> bool:
    return str(service.get("restart", "no")) == "no"


def _bind_mounts(service: Service) -> dict[str, Path]:
    """Container path → repository path of the service's bind mounts."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def _host_ports(mapping: object) -> list[int]:
    """Host ports of a ``ports:`` entry, with ``${VAR:-default}`` at its default."""
    text = _INTERPOLATION_DEFAULT.sub(r"\1", str(mapping))
    host = text.rsplit(":", 1)[0].rsplit(":", 1)[-1]
    first, _, last = host.partition("-")
    return list(range(int(first), int(last or first) + 1))


def _healthcheck_url_variable() -> str:
    """The variable the image's healthcheck script reads its URL from."""
    spec = importlib.util.spec_from_file_location("pacs_image_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.URL_VARIABLE)


# -- the file is valid compose ---------------------------------------------------


def test_compose_matches_the_compose_specification_schema() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_is_accepted_by_docker_compose_1_29() -> None:
    if not DOCKER_COMPOSE_1.exists():
        pytest.skip(f"{DOCKER_COMPOSE_1} is not installed")
    result = subprocess.run(
        [str(DOCKER_COMPOSE_1), "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the PACS containers -----------------------------------------------------------


def test_every_pacs_service_runs_in_compose(services: dict[str, Service]) -> None:
    running = set(_pacs_services(services).values())
    assert running == set(SERVICE_KINDS), f"missing: {[k.label for k in set(SERVICE_KINDS) - running]}"
    for name, kind in _pacs_services(services).items():
        assert name == kind.label, f"compose service {name!r} runs {kind.module}; name it {kind.label!r}"


def test_every_pacs_command_exists_in_the_code(services: dict[str, Service]) -> None:
    parser = build_parser()
    for name, service in services.items():
        if "build" not in service:
            continue
        command = _command(service)
        if command[:2] == ["python", "-m"]:
            kind = _kind_of(service)
            assert kind is not None and kind.installed(), f"{name}: no module {command[2]}.__main__"
        else:
            assert command[0] == "pacs", f"{name}: unexpected command {command}"
            parser.parse_args(command[1:])  # exits (SystemExit) on an unknown subcommand or flag


def test_every_pacs_variable_in_compose_is_a_setting_the_code_reads(
    services: dict[str, Service], catalog: dict[str, str]
) -> None:
    read_by_the_image = {_healthcheck_url_variable()}
    unknown = {
        f"{name}: {variable}"
        for name, service in services.items()
        for variable in _environment(service)
        if variable.startswith("PACS_")
        and variable not in read_by_the_image
        and not is_known_environment_variable(variable, catalog)
    }
    assert not unknown, f"not read by any settings class: {sorted(unknown)}"


def test_the_settings_accept_the_values_compose_gives(
    services: dict[str, Service], catalog: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt name is caught above; a bad value (JSON of the HSM rules,
    a backend name, an AE title) would stop the service at start-up."""
    for name in _pacs_services(services):
        environment = _environment(services[name])
        with monkeypatch.context() as scoped:
            for variable in [v for v in os.environ if v.startswith("PACS_")]:
                scoped.delenv(variable)
            for variable, value in environment.items():
                scoped.setenv(variable, value)
            class_paths = {catalog[variable] for variable in environment if variable in catalog}
            for class_path in sorted(class_paths):
                module_name, _, class_name = class_path.rpartition(".")
                settings_class = getattr(importlib.import_module(module_name), class_name)
                try:
                    settings_class()
                except ValidationError as exc:
                    pytest.fail(f"{name}: {class_path} refuses the compose environment: {exc}")
            for tier in StorageTiersSettings().tiers:
                StorageTierSettings.for_tier(tier)


def test_every_storage_tier_is_configured_for_every_service(services: dict[str, Service]) -> None:
    for name in _pacs_services(services):
        environment = _environment(services[name])
        tiers = [tier.strip() for tier in environment["PACS_STORAGE_TIERS"].split(",")]
        assert tiers[0] == "hot"
        for tier in tiers:
            assert f"PACS_STORAGE_{tier.upper()}_BACKEND" in environment, f"{name}: tier {tier} unconfigured"


def test_services_reach_each_other_at_their_http_ports(services: dict[str, Service]) -> None:
    ports = {
        name: int(_environment(services[name])[kind.http_port_env])
        for name, kind in _pacs_services(services).items()
    }
    for name in _pacs_services(services):
        for variable, value in _environment(services[name]).items():
            if variable.endswith(("_QUERY_URL", "_DICOMWEB_URL")):
                url = urllib.parse.urlsplit(value)
                assert url.hostname in ports, f"{name}: {variable} points at unknown {url.hostname}"
                assert url.port == ports[url.hostname], f"{name}: {variable} port != {url.hostname}'s"


def test_healthchecks_ask_each_service_its_own_port(services: dict[str, Service]) -> None:
    variable = _healthcheck_url_variable()
    for name, kind in _pacs_services(services).items():
        environment = _environment(services[name])
        url = urllib.parse.urlsplit(environment[variable])
        assert url.hostname == "127.0.0.1"
        assert url.port == int(environment[kind.http_port_env]), name
        assert url.path in {"/health/live", "/health/ready"}, name


# -- start-up order ---------------------------------------------------------------------


def test_every_long_running_container_has_a_healthcheck(services: dict[str, Service]) -> None:
    for name, service in services.items():
        if _is_one_shot(service):
            continue
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name} has no healthcheck"


def test_depends_on_waits_for_things_that_can_happen(services: dict[str, Service]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            assert condition in DEPENDS_ON_CONDITIONS, f"{name}: unknown condition {condition}"
            if condition == "service_healthy":
                assert not _is_one_shot(services[target]), f"{name}: {target} is a one-shot"
                assert services[target].get("healthcheck", {}).get("test"), f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert _is_one_shot(services[target]), f"{name}: {target} never completes (it restarts)"


def test_migrations_run_before_every_service_that_uses_the_database(services: dict[str, Service]) -> None:
    for name, kind in _pacs_services(services).items():
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", (
            f"{name} ({kind.module})"
        )
    assert _command(services["migrate"])[:2] == ["pacs", "migrate"]


def _seconds(duration: str) -> float:
    """A compose duration such as ``30s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_services_get_their_shutdown_grace_before_sigkill(services: dict[str, Service]) -> None:
    """Docker SIGKILLs after stop_grace_period (10 s unless set): a service
    draining associations and messages needs its own grace period first."""
    grace = ShutdownSettings().grace_seconds
    for name in _pacs_services(services):
        period = _seconds(str(services[name].get("stop_grace_period", "10s")))
        assert period > grace, f"{name}: stop_grace_period {period:g}s <= the service's {grace:g}s grace"


def test_replicas_do_not_fight_over_published_ports(services: dict[str, Service]) -> None:
    published: list[int] = []
    for name, service in services.items():
        replicas = int((service.get("deploy") or {}).get("replicas", 1))
        for mapping in service.get("ports", []):
            host_ports = _host_ports(mapping)
            assert len(host_ports) >= replicas, f"{name}: {replicas} replicas share host ports {host_ports}"
            published += host_ports
    assert len(published) == len(set(published)), f"a host port is published twice: {sorted(published)}"


def test_bind_mounted_files_exist_in_the_repository(services: dict[str, Service]) -> None:
    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


# -- observability ---------------------------------------------------------------------


def test_prometheus_config_passes_promtool(services: dict[str, Service], tmp_path: Path) -> None:
    """promtool checks the config and the rule files it names: those are the
    container paths, so they are pointed at the files compose mounts there."""
    mounts = _bind_mounts(services["prometheus"])
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    assert config["rule_files"], "no alert rules loaded"
    config["rule_files"] = [str(mounts[path]) for path in config["rule_files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(checked)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_replica_of_every_pacs_service(services: dict[str, Service]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, kind in _pacs_services(services).items():
        job = jobs.get(name)
        assert job is not None, f"no scrape job for {name}"
        assert job.get("metrics_path", "/metrics") == "/metrics"
        # DNS service discovery: one target per replica (static targets would hit one at random).
        [discovery] = job["dns_sd_configs"]
        assert discovery["names"] == [name] and discovery["type"] == "A"
        assert discovery["port"] == int(_environment(services[name])[kind.http_port_env]), name


def test_grafana_provisions_the_prometheus_datasource(services: dict[str, Service]) -> None:
    mounts = _bind_mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    [datasource] = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    url = urllib.parse.urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert url.hostname in services and url.port == 9090
    assert any("9090" in str(port) for port in services[str(url.hostname)].get("ports", []))


def test_grafana_loads_the_dashboards_of_the_repository(services: dict[str, Service]) -> None:
    mounts = _bind_mounts(services["grafana"])
    [provider] = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "pacs.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    dashboards_dir = mounts.get(provider["options"]["path"])
    assert dashboards_dir == DASHBOARDS, "the provider's path is not where the dashboards are mounted"
    assert sorted(DASHBOARDS.glob("*.json")), f"no dashboards in {DASHBOARDS}"
