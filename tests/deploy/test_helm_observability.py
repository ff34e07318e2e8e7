"""The chart's monitoring objects: a ServiceMonitor that scrapes every
component's HTTP port under the job names the alerts and dashboards expect,
a PrometheusRule holding exactly deploy/observability/prometheus/alerts.yaml,
and the Grafana dashboards of deploy/observability/dashboards as ConfigMaps
for the Grafana sidecar.

The chart reads those files through the symlink files/observability ->
deploy/observability (Helm follows it in template, lint and package), so
there is one copy; the packaged chart is checked to carry them byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from pacs_common.localrun.runner import SERVICE_KINDS

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "pacs"
OBSERVABILITY = REPO / "deploy" / "observability"
ALERTS = OBSERVABILITY / "prometheus" / "alerts.yaml"
DASHBOARDS = sorted((OBSERVABILITY / "dashboards").glob("*.json"))
MONITORING_VALUES = Path(__file__).resolve().parent / "helm-values" / "monitoring.yaml"
RELEASE = "obs"
NAMESPACE = "imaging"

Manifest = dict[str, Any]


def helm_binary() -> str | None:
    """$HELM, else helm on PATH, else the one deploy/local/bootstrap.sh --test installs."""
    candidates = [os.environ.get("HELM"), shutil.which("helm"), str(REPO / ".tools" / "helm" / "helm")]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def template(helm: str, chart: Path, *args: str) -> list[Manifest]:
    result = subprocess.run(
        [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def helm() -> str:
    found = helm_binary()
    if found is None:
        pytest.skip("no helm: set HELM, put helm on PATH, or run deploy/local/bootstrap.sh --test")
    return found


@pytest.fixture(scope="module")
def monitoring(helm: str) -> list[Manifest]:
    return template(helm, CHART, "--values", str(MONITORING_VALUES))


@pytest.fixture(scope="module")
def monitoring_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(MONITORING_VALUES.read_text())["metrics"]
    return values


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def dashboard_maps(manifests: list[Manifest]) -> list[Manifest]:
    return [
        m for m in of_kind(manifests, "ConfigMap") if any(key.endswith(".json") for key in m.get("data", {}))
    ]


def test_chart_reads_deploy_observability_through_a_symlink() -> None:
    link = CHART / "files" / "observability"
    assert link.is_symlink()
    assert link.resolve() == OBSERVABILITY.resolve()
    assert DASHBOARDS, "deploy/observability/dashboards has no dashboard"


def test_monitoring_objects_are_off_by_default(helm: str) -> None:
    manifests = template(helm, CHART)
    assert of_kind(manifests, "ServiceMonitor") == []
    assert of_kind(manifests, "PrometheusRule") == []
    assert dashboard_maps(manifests) == []


def test_service_monitor_scrapes_every_component_under_its_job_name(
    monitoring: list[Manifest], monitoring_values: dict[str, Any]
) -> None:
    (monitor,) = of_kind(monitoring, "ServiceMonitor")
    spec = monitor["spec"]
    assert (
        monitor["metadata"]["labels"]["release"] == monitoring_values["serviceMonitor"]["labels"]["release"]
    )
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["interval"] == monitoring_values["serviceMonitor"]["interval"]
    selector = spec["selector"]["matchLabels"]
    scraped = [
        s
        for s in of_kind(monitoring, "Service")
        if all(s["metadata"]["labels"].get(key) == value for key, value in selector.items())
    ]
    # The job label comes from this Service label: the names compose's Prometheus uses.
    jobs = {s["metadata"]["labels"][spec["jobLabel"]] for s in scraped}
    assert jobs == {kind.label for kind in SERVICE_KINDS}
    for service in scraped:
        assert [port["name"] for port in service["spec"]["ports"]] == ["http"], service["metadata"]["name"]


def test_prometheus_rule_holds_the_alert_rules_unchanged(
    monitoring: list[Manifest], monitoring_values: dict[str, Any]
) -> None:
    (rule,) = of_kind(monitoring, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == monitoring_values["prometheusRule"]["labels"]["release"]
    expected = yaml.safe_load(ALERTS.read_text())["groups"]
    assert expected
    # Alert templates ({{ $labels.job }}) must reach Prometheus as written, not be expanded by Helm.
    assert rule["spec"]["groups"] == expected


def test_dashboards_are_config_maps_for_the_grafana_sidecar(
    monitoring: list[Manifest], monitoring_values: dict[str, Any]
) -> None:
    maps = dashboard_maps(monitoring)
    by_file = {key: (m, value) for m in maps for key, value in m["data"].items()}
    assert sorted(by_file) == [path.name for path in DASHBOARDS]
    assert len(maps) == len(DASHBOARDS)  # one ConfigMap each: far below the 1 MiB limit
    for path in DASHBOARDS:
        config_map, content = by_file[path.name]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == monitoring_values["dashboards"]["namespace"]
        assert config_map["metadata"]["annotations"] == monitoring_values["dashboards"]["annotations"]
        assert json.loads(content) == json.loads(path.read_text()), path.name


def test_packaged_chart_carries_the_observability_files_byte_for_byte(helm: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [helm, "package", str(CHART), "--destination", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("pacs-*.tgz")
    expected = [ALERTS, *DASHBOARDS]
    with tarfile.open(archive) as bundle:
        for path in expected:
            member = bundle.extractfile(f"pacs/files/observability/{path.relative_to(OBSERVABILITY)}")
            assert member is not None, path
            assert member.read() == path.read_bytes(), path
    # The packaged chart renders the same monitoring objects without the repository around it.
    packaged = template(helm, archive, "--values", str(MONITORING_VALUES))
    assert len(of_kind(packaged, "PrometheusRule")) == 1
    assert len(dashboard_maps(packaged)) == len(DASHBOARDS)
