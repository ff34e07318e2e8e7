"""The alert rules load in Prometheus (``promtool check rules``), pass their
unit tests (``promtool test rules``: each alert fires on the series that
should raise it and stays quiet on the healthy look-alike), and follow the
conventions on-call relies on: a severity, a summary, a description and a
runbook section that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.deploy

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy/observability/prometheus"
ALERTS = RULES_DIR / "alerts.yaml"
ALERT_TESTS = RULES_DIR / "alerts.test.yaml"
README = RULES_DIR.parent / "README.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="promtool not installed (apt install prometheus)"
)
SEVERITIES = {"critical", "warning", "info"}


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


@needs_promtool
def test_the_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """With the dead-letter threshold raised, its unit test fails: the tests
    check the rules, they do not merely run."""
    text = ALERTS.read_text()
    broken = text.replace(
        "max(pacs_ingest_dead_letter_queue_depth) > 0", "max(pacs_ingest_dead_letter_queue_depth) > 5"
    )
    assert broken != text
    (tmp_path / "alerts.yaml").write_text(broken)
    (tmp_path / "alerts.test.yaml").write_text(ALERT_TESTS.read_text())
    result = _promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "PacsDeadLetterQueueNotEmpty" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _rules()} - fired == set()


def test_the_alerts_the_operators_need_exist() -> None:
    alerts = {rule["alert"]: rule["expr"] for rule in _rules()}
    service_down = alerts["PacsServiceDown"].strip()
    assert service_down.startswith("up{job=~") and service_down.endswith("== 0")
    for service in ("dimse-gateway", "ingest-worker", "query-service", "dicomweb-api"):
        assert service in service_down
    for name in ("PacsIngestLagHigh", "PacsDeadLetterQueueNotEmpty", "PacsIntegrityMismatch"):
        assert name in alerts
    assert any("pacs_hsm_migration_failures_total" in expr for expr in alerts.values())
    assert any('status="0xA700"' in expr for expr in alerts.values())


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    anchors = {_anchor(heading) for heading in re.findall(r"^#+ (.+)$", README.read_text(), re.MULTILINE)}
    names = [rule["alert"] for rule in _rules()]
    assert len(set(names)) == len(names)
    for rule in _rules():
        assert re.fullmatch(r"Pacs[A-Z][A-Za-z]+", rule["alert"])
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        path, _, anchor = annotations["runbook"].partition("#")
        assert path == "deploy/observability/README.md"
        assert anchor == rule["alert"].lower() and anchor in anchors, f"{rule['alert']}: no README section"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


@needs_promtool
def test_the_local_runner_s_prometheus_config_loads_these_rules(tmp_path: Path) -> None:
    """What ``pacs run --prometheus`` writes is a configuration Prometheus accepts, with these rules."""
    from pacs_common.localrun.prometheus import ScrapeTarget, find_alert_rules, render_config

    rules = find_alert_rules(tmp_path)
    assert rules == ALERTS
    targets = [
        ScrapeTarget("dimse-gateway", "gateway-0", "127.0.0.1:8081"),
        ScrapeTarget("ingest-worker", "worker-0", "127.0.0.1:8082"),
        ScrapeTarget("ingest-worker", "worker-1", "127.0.0.1:8087"),
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        render_config(targets, [rules], scrape_interval_seconds=5, evaluation_interval_seconds=5)
    )
    result = _promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout
    jobs = yaml.safe_load(config.read_text())["scrape_configs"]
    assert {
        job["job_name"]: [group["labels"]["process"] for group in job["static_configs"]] for job in jobs
    } == {
        "dimse-gateway": ["gateway-0"],
        "ingest-worker": ["worker-0", "worker-1"],
    }
