"""``pacs run --prometheus``: the local system with Debian's Prometheus
scraping every service and evaluating deploy/observability's alert rules.

Through Prometheus' HTTP API: every process is a target and up; every alert
rule is loaded and evaluates without error; instances stored with DCMTK's
storescu show in the scraped series the dashboards query; a healthy system
raises no alert (not even a pending one); a killed service does.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pacs_common.localrun.prometheus import LocalPrometheus, PrometheusOptions
from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.corpus import write_ct_series
from pacs_e2e.dcmtk import storescu
from pacs_e2e.metrics import wait_until_drained
from pacs_e2e.system import running_system

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy/observability/dashboards"
ALERTS = REPO / "deploy/observability/prometheus/alerts.yaml"
PROMETHEUS_BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"
# Alerts a healthy, idle system may raise: none.
EXPECTED_IN_A_HEALTHY_SYSTEM: frozenset[str] = frozenset()
# Labelled series the store below must have produced.
EXERCISED = frozenset(
    {
        "pacs_ingest_instances_total",
        "pacs_ingest_lag_seconds_bucket",
        "pacs_dimse_operations_total",
        "pacs_dimse_associations_total",
        "pacs_dimse_store_seconds_bucket",
        "pacs_ingest_stage_duration_seconds_bucket",
    }
)
INSTANCES = 3
TIMEOUT = 30.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(PROMETHEUS_BINARY).exists(), reason="Prometheus not installed (apt install prometheus)"
    ),
]

T = TypeVar("T")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    """Every service, with Prometheus scraping every 2 s and evaluating every second."""
    options = PrometheusOptions(port=0, scrape_interval_seconds=2, evaluation_interval_seconds=1)
    with running_system(
        tmp_path_factory.mktemp("pacs-prometheus"),
        hsm_migrators=1,
        prefetch_schedulers=1,
        ai_connectors=1,
        prometheus=options,
    ) as started:
        yield started


@pytest.fixture(scope="module")
def prometheus(system: LocalSystem) -> LocalPrometheus:
    assert system.prometheus is not None
    return system.prometheus


@pytest.fixture(scope="module")
def stored(system: LocalSystem, tmp_path_factory: pytest.TempPathFactory) -> int:
    files = write_ct_series(tmp_path_factory.mktemp("ct"), INSTANCES, rows=64, columns=64)
    result = storescu(system.gateway_port, files, called=system.ae_title)
    assert result.returncode == 0, result.output
    wait_until_drained(system, timeout=TIMEOUT)
    return len(files)


def _api(prometheus: LocalPrometheus, path: str, **params: str) -> Any:
    response = httpx.get(f"{prometheus.url}/api/v1/{path}", params=params, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


def _eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {TIMEOUT:g}s; last: {value!r}")
        time.sleep(0.25)


def _query(prometheus: LocalPrometheus, expr: str) -> dict[str, float]:
    """Instant query: ``job/process`` (or ``""``) → value."""
    result = _api(prometheus, "query", query=expr)["result"]
    return {
        f"{r['metric'].get('job', '')}/{r['metric'].get('process', '')}".strip("/"): float(r["value"][1])
        for r in result
    }


def _alerts(prometheus: LocalPrometheus) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = _api(prometheus, "alerts")["alerts"]
    return alerts


def test_every_service_process_is_a_target_and_up(system: LocalSystem, prometheus: LocalPrometheus) -> None:
    expected = {f"{s.kind.label}/{s.name}" for s in system.services}
    assert {s.kind.label for s in system.services} >= {"dimse-gateway", "ingest-worker", "query-service"}
    assert len(expected) == 7
    up = _eventually(
        lambda: _query(prometheus, "up"), lambda v: set(v) == expected and all(v.values()), "all up"
    )
    assert up == dict.fromkeys(expected, 1.0)
    targets = _api(prometheus, "targets")["activeTargets"]
    addresses = {t["labels"]["process"]: t["scrapeUrl"] for t in targets}
    assert addresses == {s.name: s.metrics_url for s in system.services}


def test_the_alert_rules_are_loaded_and_evaluate(prometheus: LocalPrometheus) -> None:
    document = yaml.safe_load(ALERTS.read_text())
    expected = {rule["alert"] for group in document["groups"] for rule in group["rules"]}

    def rules() -> dict[str, str]:
        groups = _api(prometheus, "rules", type="alert")["groups"]
        return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

    loaded = _eventually(rules, lambda r: set(r) == expected and set(r.values()) == {"ok"}, "rules evaluated")
    assert loaded == dict.fromkeys(expected, "ok")
    assert prometheus.rule_files == (ALERTS,)


def test_stored_instances_show_in_the_scraped_series(prometheus: LocalPrometheus, stored: int) -> None:
    sums = {
        "sum(pacs_ingest_instances_total)": float(stored),
        'sum(pacs_dimse_operations_total{operation="C-STORE", status="0x0000"})': float(stored),
        'sum(pacs_dimse_associations_total{outcome="accepted"})': 1.0,
        "sum(pacs_ingest_lag_seconds_count)": float(stored),
        "max(pacs_ingest_dead_letter_queue_depth)": 0.0,
    }

    def values() -> dict[str, float | None]:
        return {expr: _query(prometheus, expr).get("") for expr in sums}

    # Each target is scraped on its own beat: wait until all show the store.
    def reached(seen: dict[str, float | None]) -> bool:
        return all((value := seen[expr]) is not None and value >= want for expr, want in sums.items())

    seen = _eventually(values, reached, "the store")
    assert seen == sums


def test_the_dashboards_metrics_are_exposed_and_scraped(
    system: LocalSystem, prometheus: LocalPrometheus, stored: int
) -> None:
    used = _dashboard_metric_names()
    declared, sampled = _exposed_by_services(system)
    assert used - declared == set(), "dashboards query metrics no running service declares"
    assert EXERCISED - (used & sampled) == set()
    # Whatever the services report (unlabelled metrics, and the labelled
    # ones the store produced), Prometheus has scraped.
    expected = used & sampled
    scraped = _eventually(
        lambda: set(_api(prometheus, "label/__name__/values")),
        lambda names: expected <= names,
        "dashboard metrics scraped",
    )
    assert expected <= scraped
    assert len(expected) >= 20


def test_a_healthy_system_raises_no_alert(prometheus: LocalPrometheus, stored: int) -> None:
    # Prometheus has scraped the store (the test above): let every rule see it.
    evaluated = time.time()
    _eventually(
        lambda: _api(prometheus, "rules", type="alert")["groups"],
        lambda groups: all(_seconds(g["lastEvaluation"]) > evaluated for g in groups),
        "rules evaluated after the store",
    )
    unexpected = [
        a for a in _alerts(prometheus) if a["labels"]["alertname"] not in EXPECTED_IN_A_HEALTHY_SYSTEM
    ]
    assert unexpected == []


def test_a_killed_service_raises_service_down(system: LocalSystem, prometheus: LocalPrometheus) -> None:
    system.kill_service("ai-0")
    alerts = _eventually(
        lambda: [a for a in _alerts(prometheus) if a["labels"]["alertname"] == "PacsServiceDown"],
        bool,
        "PacsServiceDown",
    )
    assert [(a["labels"]["job"], a["labels"]["process"], a["state"]) for a in alerts] == [
        ("ai-connector", "ai-0", "pending")  # firing after the rule's "for: 1m"
    ]
    assert alerts[0]["labels"]["severity"] == "critical"


def _seconds(timestamp: str) -> float:
    """Prometheus' RFC 3339 timestamps (nanoseconds, Z) as Unix time."""
    trimmed = re.sub(r"(\.\d{6})\d*", r"\1", timestamp).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(trimmed).timestamp()


def _dashboard_metric_names() -> set[str]:
    """``pacs_*`` names in the dashboards' queries (no label or value of ours
    starts with ``pacs_``; tests/deploy checks the names with a full tokenizer)."""
    text = "\n".join(path.read_text() for path in DASHBOARDS.glob("*.json"))
    return set(re.findall(r"\bpacs_[a-z0-9_]+", text))


def _exposed_by_services(system: LocalSystem) -> tuple[set[str], set[str]]:
    """Sample names the running services declare (``# TYPE``, with the
    suffixes of the type) and those they report a sample for."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    declared: set[str] = set()
    sampled: set[str] = set()
    with httpx.Client(timeout=5) as client:
        for service in system.services:
            if not service.alive():
                continue
            for family in text_string_to_metric_families(client.get(service.metrics_url).text):
                declared.update(family.name + s for s in suffixes.get(family.type, ("",)))
                sampled.update(sample.name for sample in family.samples)
    return declared, sampled
