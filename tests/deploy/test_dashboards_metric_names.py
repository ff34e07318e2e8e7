"""Every metric a dashboard panel or an alert rule queries is one the
services really expose (or Prometheus' own ``up``/``scrape_*``).

The exposed names come from the services' own metric classes, instantiated
into fresh registries (every ``metrics.py`` of the services and of
pacs_common), so a renamed metric breaks this test, not a dashboard in
production.  Names are taken out of the PromQL by a tokenizer that knows
functions, keywords, label lists and matchers, durations and strings; the
real PromQL parser (``promtool check rules``) checks the syntax.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pacs_common.resilience import Dependencies

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy/observability/dashboards"
ALERTS = REPO / "deploy/observability/prometheus/alerts.yaml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# Series Prometheus itself writes for every target / for alerting.
PROMETHEUS_OWN = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)
# Sample names per metric type, as the text exposition writes them.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}

AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ]
)
FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_quantile",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "ln",
        "log2",
        "log10",
        "minute",
        "month",
        "predict_linear",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "time",
        "timestamp",
        "vector",
        "year",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "quantile_over_time",
        "stddev_over_time",
        "stdvar_over_time",
        "last_over_time",
        "present_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "cos",
        "cosh",
        "sin",
        "sinh",
        "tan",
        "tanh",
        "deg",
        "rad",
        "pi",
    ]
)
# Words that take a parenthesised list of label names.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"}) | LABEL_LIST_KEYWORDS

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)(?:[smhdwy]|ms)*(?:\d+(?:[smhdwy]|ms))*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<punct>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],:@])
    """,
    re.VERBOSE,
)
# Grafana's variables stand where PromQL has durations or values.
_GRAFANA_VARIABLE = re.compile(r"\$(?:__[a-z_]+|\{[^}]*\}|[a-zA-Z_][a-zA-Z0-9_]*)")


class PromQLSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokenize(expr: str) -> list[Token]:
    text = _GRAFANA_VARIABLE.sub("5m", expr)
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise PromQLSyntaxError(f"cannot read {text[position:]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(Token(kind, match.group()))
        position = match.end()
    return tokens


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects; unknown function names raise."""
    tokens = tokenize(expr)
    names: set[str] = set()
    braces = brackets = 0
    label_list_depth: int | None = None
    parens = 0
    for index, token in enumerate(tokens):
        following = tokens[index + 1].text if index + 1 < len(tokens) else ""
        if token.kind == "punct":
            if token.text == "{":
                braces += 1
            elif token.text == "}":
                braces -= 1
            elif token.text == "[":
                brackets += 1
            elif token.text == "]":
                brackets -= 1
            elif token.text == "(":
                parens += 1
            elif token.text == ")":
                if label_list_depth == parens:
                    label_list_depth = None
                parens -= 1
            continue
        if token.kind != "name" or braces or brackets or label_list_depth is not None:
            continue  # label names in matchers and in by(...), durations in [...]
        word = token.text
        if word in LABEL_LIST_KEYWORDS:
            if following == "(":
                label_list_depth = parens + 1
            continue
        if word in KEYWORDS or word in AGGREGATIONS:
            continue  # an aggregation may take its by/without clause before its "("
        if following == "(":
            if word not in FUNCTIONS and word not in AGGREGATIONS:
                raise PromQLSyntaxError(f"unknown function {word!r} in {expr!r}")
            continue
        names.add(word)
    if braces or brackets or parens:
        raise PromQLSyntaxError(f"unbalanced brackets in {expr!r}")
    return names


# -- what the services expose ---------------------------------------------------


def _metrics_modules() -> Iterator[str]:
    roots = [*sorted(REPO.glob("services/*/src")), REPO / "libs/common/src"]
    for root in roots:
        for path in sorted(root.rglob("metrics.py")):
            yield ".".join(path.relative_to(root).with_suffix("").parts)


def _register(cls: type, registry: CollectorRegistry) -> None:
    create = getattr(cls, "create", None)
    if inspect.ismethod(create):  # a classmethod factory
        create(registry)
    else:
        cls(registry)


def exposed_families() -> dict[str, str]:
    """Family name → metric type, over every metrics class of every service."""
    families: dict[str, str] = {}
    for module_name in _metrics_modules():
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module_name or not _takes_registry(cls):
                continue
            registry = CollectorRegistry()
            _register(cls, registry)
            for family in registry.collect():
                families[family.name] = family.type
    # Custom collectors registered by every service's main, outside metrics.py.
    registry = CollectorRegistry()
    registry.register(Dependencies())
    for family in registry.collect():
        families[family.name] = family.type
    return families


def _takes_registry(cls: type) -> bool:
    create = getattr(cls, "create", None)
    target = create if inspect.ismethod(create) else cls
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    annotations = {str(p.annotation) for p in parameters}
    return len(parameters) == 1 and any("CollectorRegistry" in a for a in annotations)


def exposed_names(families: dict[str, str]) -> set[str]:
    return {name + suffix for name, kind in families.items() for suffix in _SUFFIXES[kind]} | PROMETHEUS_OWN


# -- what the dashboards and rules query ----------------------------------------------


def dashboard_expressions() -> dict[str, str]:
    """``file / panel title / refId`` → expr, over every dashboard."""
    found: dict[str, str] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in _all_panels(board["panels"]):
            for target in panel.get("targets", []):
                found[f"{path.name} / {panel['title']} / {target['refId']}"] = target["expr"]
    return found


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        nested = panel.get("panels")
        if isinstance(nested, list):
            yield from _all_panels(nested)


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        f"{group['name']} / {rule.get('alert') or rule.get('record')}": str(rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    }


def unknown_names(expr: str, known: set[str]) -> set[str]:
    return metric_names(expr) - known


@pytest.fixture(scope="module")
def families() -> dict[str, str]:
    return exposed_families()


@pytest.fixture(scope="module")
def known(families: dict[str, str]) -> set[str]:
    return exposed_names(families)


# -- the tokenizer itself -----------------------------------------------------------------


def test_tokenizer_finds_metric_names_and_skips_everything_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(pacs_ingest_stage_duration_seconds_bucket"
        '{stage=~"read|index", instance!="x"}[$__rate_interval]))) > bool 2'
        " and on (job) group_left (instance) max without (tier) (pacs_hsm_tier_bytes offset 1h)"
        " or deriv(max(pacs_ingest_queue_depth)[15m:1m]) > 0 unless vector(0)"
        " / sum(pacs_ingest_bytes_total) * 1e3 + 0x10 - time()"
    )
    assert metric_names(expr) == {
        "pacs_ingest_stage_duration_seconds_bucket",
        "pacs_hsm_tier_bytes",
        "pacs_ingest_queue_depth",
        "pacs_ingest_bytes_total",
    }
    assert metric_names("sum(rate(x_total[5m])) by (job)") == {"x_total"}
    assert metric_names("count(up == 0) or vector(0)") == {"up"}


def test_a_misspelt_metric_name_is_flagged(known: set[str]) -> None:
    good = 'sum by (outcome) (rate(pacs_ingest_instances_total{outcome="created"}[5m]))'
    assert unknown_names(good, known) == set()
    assert unknown_names("sum(rate(pacs_ingest_instance_total[5m]))", known) == {"pacs_ingest_instance_total"}
    # A counter without its _total, a histogram without _bucket: not series Prometheus has.
    assert unknown_names("rate(pacs_dimse_operations[5m])", known) == {"pacs_dimse_operations"}
    assert unknown_names("histogram_quantile(0.9, rate(pacs_query_duration_seconds[5m]))", known) == {
        "pacs_query_duration_seconds"
    }


def test_a_misspelt_function_or_broken_expression_is_flagged() -> None:
    with pytest.raises(PromQLSyntaxError, match="rat"):
        metric_names("sum(rat(pacs_ingest_bytes_total[5m]))")
    with pytest.raises(PromQLSyntaxError, match="unbalanced"):
        metric_names("sum(rate(pacs_ingest_bytes_total[5m])")


# -- the catalogue -------------------------------------------------------------------------


def test_the_catalogue_holds_every_service_s_metrics(families: dict[str, str]) -> None:
    expected = {
        "pacs_ingest_instances": "counter",  # ingest-worker
        "pacs_ingest_dead_letter_queue_depth": "gauge",
        "pacs_dimse_operations": "counter",  # dimse-gateway
        "pacs_query_duration_seconds": "histogram",  # query-service
        "pacs_hsm_tier_bytes": "gauge",  # hsm-migrator
        "pacs_ai_jobs": "counter",  # ai-connector
        "pacs_prefetch_jobs": "counter",  # prefetch-scheduler: prefetch, tasks, forwarding, sync
        "pacs_task_runs": "counter",
        "pacs_forward_instances": "counter",
        "pacs_sync_runs": "counter",
        "pacs_restore_failed": "counter",  # pacs_common (dicomweb-api, gateway)
    }
    assert {name: families.get(name) for name in expected} == expected


# -- dashboards and rules against the catalogue ------------------------------------------------


def test_every_dashboard_query_uses_only_exposed_metrics(known: set[str]) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 50
    unknown = {where: sorted(unknown_names(expr, known)) for where, expr in expressions.items()}
    assert {where: names for where, names in unknown.items() if names} == {}


def test_every_alert_rule_uses_only_exposed_metrics(known: set[str]) -> None:
    expressions = alert_expressions()
    assert len(expressions) >= 10
    unknown = {where: sorted(unknown_names(expr, known)) for where, expr in expressions.items()}
    assert {where: names for where, names in unknown.items() if names} == {}


def test_the_dashboards_cover_what_operators_watch() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_expressions().values()))
    watched = {
        "up",
        "pacs_ingest_instances_total",
        "pacs_ingest_lag_seconds_bucket",
        "pacs_ingest_queue_depth",
        "pacs_ingest_dead_letter_queue_depth",
        "pacs_dimse_operations_total",
        "pacs_dimse_associations_total",
        "pacs_dimse_active_associations",
        "pacs_query_duration_seconds_bucket",
        "pacs_hsm_tier_instances",
        "pacs_hsm_tier_bytes",
        "pacs_prefetch_jobs_total",
        "pacs_ai_jobs_total",
        "pacs_forward_instances_total",
        "pacs_sync_runs_total",
        "pacs_task_runs_total",
        "pacs_integrity_mismatches_total",
    }
    assert watched - used == set()


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed (apt install prometheus)")
def test_prometheus_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query as a recording rule, through promtool's (Prometheus') own parser."""
    expressions = dashboard_expressions()
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _GRAFANA_VARIABLE.sub("5m", expr)}
                    for i, expr in enumerate(expressions.values())
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout

    # And the same check refuses a broken query: the test above could fail.
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(a[5m]"}]}]})
    )
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
