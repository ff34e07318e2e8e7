"""The Grafana dashboards are importable as they are: valid dashboard JSON
(schemaVersion 39), the Prometheus data source a ``${datasource}`` variable
(no data source, dashboard id or panel id tied to one Grafana instance),
unique uids and titles, every panel placed on the grid without overlaps and
querying something."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.deploy

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy/observability/dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24


def _load() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


BOARDS = _load()


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _datasource_references(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_references(item)


def test_there_are_dashboards_with_unique_uids_and_titles() -> None:
    assert len(BOARDS) >= 5
    uids = [board["uid"] for board in BOARDS.values()]
    titles = [board["title"] for board in BOARDS.values()]
    assert len(set(uids)) == len(uids)
    assert len(set(titles)) == len(titles)
    for name, board in BOARDS.items():
        assert name == f"{board['uid']}.json"
        assert 0 < len(board["uid"]) <= 40 and board["uid"].replace("-", "").isalnum()


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_is_portable(name: str) -> None:
    board = BOARDS[name]
    assert board["id"] is None, "a dashboard id belongs to one Grafana instance"
    assert 36 <= board["schemaVersion"] <= 41
    assert board["title"].startswith("PACS / ")
    assert "pacs" in board["tags"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for reference in _datasource_references(board["panels"]):
        assert reference == DATASOURCE, "panels must use the ${datasource} variable"
    for annotation in board["annotations"]["list"]:
        assert annotation["datasource"]["uid"] in ("-- Grafana --", "${datasource}")


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_queries_prometheus_with_an_expression(name: str) -> None:
    panels = list(_panels(BOARDS[name]))
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids), "duplicate panel ids"
    titles = [panel["title"] for panel in panels]
    assert len(set(titles)) == len(titles), "duplicate panel titles"
    queried = [panel for panel in panels if panel["type"] != "row"]
    assert len(queried) >= 4
    for panel in queried:
        assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table")
        assert panel["datasource"] == DATASOURCE
        targets = panel["targets"]
        assert targets, f"{panel['title']}: no queries"
        ref_ids = [target["refId"] for target in targets]
        assert len(set(ref_ids)) == len(ref_ids), f"{panel['title']}: duplicate refId"
        for target in targets:
            assert target["expr"].strip(), f"{panel['title']}: empty expression"
            assert target["datasource"] == DATASOURCE
        assert "fieldConfig" in panel and "unit" in panel["fieldConfig"]["defaults"]


def _grid_problems(board: dict[str, Any]) -> list[str]:
    """Panels off the 24-column grid or on top of each other."""
    problems: list[str] = []
    occupied: dict[tuple[int, int], str] = {}
    for panel in _panels(board):
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        if not all(isinstance(v, int) for v in (x, y, w, h)) or min(x, y) < 0 or min(w, h) <= 0:
            problems.append(f"{panel['title']}: bad gridPos {grid}")
            continue
        if x + w > GRID_COLUMNS:
            problems.append(f"{panel['title']}: wider than the grid")
        cells = {(column, row) for column in range(x, x + w) for row in range(y, y + h)}
        hit = sorted({occupied[cell] for cell in cells if cell in occupied})
        if hit:
            problems.append(f"{panel['title']} overlaps {', '.join(hit)}")
        occupied.update(dict.fromkeys(cells, panel["title"]))
    return problems


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_sit_on_the_grid_without_overlapping(name: str) -> None:
    assert _grid_problems(BOARDS[name]) == []


def test_the_grid_check_catches_overlaps_and_overflows() -> None:
    board = {
        "panels": [
            {"title": "a", "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8}},
            {"title": "b", "gridPos": {"x": 6, "y": 4, "w": 12, "h": 8}},
            {"title": "c", "gridPos": {"x": 18, "y": 20, "w": 12, "h": 8}},
        ]
    }
    assert _grid_problems(board) == ["b overlaps a", "c: wider than the grid"]
