"""The Dockerfile without a Docker engine: what it installs (the locked,
non-dev dependency set), that everything it COPYs is in the build context
.dockerignore leaves, that the runtime stage runs as a non-root user with a
health check, and that the health-check script tells a healthy service from
a failing or absent one."""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from pacs_common.localrun.runner import SERVICE_KINDS
from pacs_common.settings_catalog import environment_variables, is_known_environment_variable

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK_SCRIPT = REPO / "deploy" / "docker" / "healthcheck.py"
RUNTIME_BASE = "python:3.11-slim-bookworm"
NON_ROOT_UID = "10001"
DEV_ONLY_PACKAGES = ("pytest", "mypy", "ruff", "moto", "testcontainers", "hypothesis", "pacs-e2e")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [rest for instruction, rest in self.instructions if instruction == keyword]


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, bases with ARGs substituted."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            global_args[name] = default
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return _stages(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def _build_context_includes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``path`` in the build context (the last
    matching pattern wins; a pattern matching a parent directory matches)."""
    included = True
    parts = path.strip("/").split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern_parts = pattern.lstrip("!").strip("/").split("/")
        if pattern_parts[0] == "**":
            tail = pattern_parts[1:]
            candidates = [parts[i : i + len(tail)] for i in range(len(parts))]
            matched = any(len(c) == len(tail) and all(map(fnmatch.fnmatchcase, c, tail)) for c in candidates)
        else:
            head = parts[: len(pattern_parts)]
            matched = len(head) == len(pattern_parts) and all(map(fnmatch.fnmatchcase, head, pattern_parts))
        if matched:
            included = negated
    return included


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _copy_sources(stage: Stage) -> list[str]:
    """Sources of the stage's COPY instructions from the build context."""
    sources: list[str] = []
    for arguments in stage.arguments("COPY"):
        words = shlex.split(arguments)
        if any(word.startswith("--from") for word in words):
            continue
        sources += [word for word in words if not word.startswith("--")][:-1]
    return sources


# -- what the image is built from ------------------------------------------------------


def test_runtime_stage_is_slim_python_3_11(runtime: Stage) -> None:
    assert runtime.base == RUNTIME_BASE


def test_dependencies_come_from_the_lock_file_without_dev_tools(stages: list[Stage]) -> None:
    syncs = [run for stage in stages for run in stage.arguments("RUN") if "uv sync" in run]
    assert syncs, "no uv sync in the Dockerfile"
    for command in syncs:
        assert "--frozen" in command and "--no-dev" in command, command
    assert "--no-editable" in syncs[-1], "workspace members must be installed, not linked to /src"


def _locked_non_dev_set() -> list[str]:
    """What ``uv sync --frozen --no-dev`` installs: package names, and the
    workspace members as their paths (``./services/query-service``)."""
    exported = subprocess.run(
        [
            os.environ.get("UV", "uv"),
            "export",
            "--frozen",
            "--no-dev",
            "--no-editable",
            "--no-hashes",
            "--format",
            "requirements-txt",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split("==")[0].strip() for line in exported.splitlines() if line[:1] not in "# "]


@pytest.fixture(scope="module")
def locked_non_dev_set() -> list[str]:
    return _locked_non_dev_set()


def test_the_locked_non_dev_set_is_every_service_and_no_test_tool(locked_non_dev_set: list[str]) -> None:
    for kind in SERVICE_KINDS:
        assert f"./services/{kind.label}" in locked_non_dev_set, kind.label
    assert "./libs/common" in locked_non_dev_set
    leaked = [package for package in DEV_ONLY_PACKAGES if package in locked_non_dev_set]
    assert not leaked, f"dev-only packages in the image: {leaked}"


def test_every_installed_member_is_copied_manifest_first(
    stages: list[Stage], locked_non_dev_set: list[str]
) -> None:
    """Manifests before the dependency layer (so it is cached until uv.lock
    changes), sources before the install of the members themselves."""
    [builder] = [stage for stage in stages if any("uv sync" in run for run in stage.arguments("RUN"))]
    copied: list[str] = []
    at_each_sync: list[list[str]] = []
    for instruction, rest in builder.instructions:
        if instruction == "COPY" and "--from" not in rest:
            copied += shlex.split(rest)[:-1]
        elif instruction == "RUN" and "uv sync" in rest:
            at_each_sync.append(list(copied))
    first_sync, last_sync = at_each_sync[0], at_each_sync[-1]
    members = [path.removeprefix("./") for path in locked_non_dev_set if path.startswith("./")]
    assert members, "no workspace member in the export"
    for member in members:
        assert f"{member}/pyproject.toml" in first_sync, f"{member}/pyproject.toml not copied before uv sync"
        sources = f"{member}/src"
        assert any(
            sources == source.rstrip("/") or sources.startswith(source.rstrip("/") + "/")
            for source in last_sync
        ), f"{sources} not copied before the last uv sync"


def test_everything_copied_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = _dockerignore_patterns()
    for stage in stages:
        for source in _copy_sources(stage):
            path = REPO / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            files = (
                [p.relative_to(REPO).as_posix() for p in path.rglob("*.py")] if path.is_dir() else [source]
            )
            sent = [file for file in files if _build_context_includes(file, patterns)]
            assert sent, f"COPY {source}: excluded by .dockerignore"
    for kind in SERVICE_KINDS:
        main = f"services/{kind.label}/src/{kind.module}/__main__.py"
        assert _build_context_includes(main, patterns), main


def test_the_build_context_leaves_out_local_state() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".tools/helm/helm",
        "data/hot/x.dcm",
        ".pacs/run/state.json",
        ".git/HEAD",
    ):
        assert not _build_context_includes(path, patterns), path
    assert not _build_context_includes("services/dimse-gateway/tests/test_x.py", patterns)
    assert not _build_context_includes("libs/common/src/pacs_common/__pycache__/x.pyc", patterns)


# -- how the image runs ----------------------------------------------------------------


def test_runtime_runs_as_a_non_root_user(runtime: Stage) -> None:
    """Numeric, so Kubernetes' runAsNonRoot can verify it; the same uid the image creates."""
    users = runtime.arguments("USER")
    assert users, "no USER: the services would run as root"
    uid = users[-1].split(":")[0]
    assert uid == NON_ROOT_UID
    stage_args = dict(argument.partition("=")[::2] for argument in runtime.arguments("ARG"))
    created = [
        re.sub(r"\$\{(\w+)\}", lambda m: stage_args[m.group(1)], run) for run in runtime.arguments("RUN")
    ]
    assert any(f"useradd --system --uid {uid} " in run for run in created), "the uid is not created"


def test_runtime_has_no_build_tools(runtime: Stage) -> None:
    runs = " ".join(runtime.arguments("RUN"))
    for tool in ("apt-get install", "gcc", "build-essential", "pip install", "uv "):
        assert tool not in runs, tool
    assert all("uv" not in source.split("/")[-1] for source in _copy_sources(runtime))


def test_runtime_healthcheck_runs_the_script_it_copies(runtime: Stage) -> None:
    [healthcheck] = runtime.arguments("HEALTHCHECK")
    command = healthcheck.split("CMD", 1)[1]
    copies = [shlex.split(arguments) for arguments in runtime.arguments("COPY")]
    installed = {words[-1]: words[-2] for words in copies}
    script_in_image = next(path for path in installed if path in command)
    assert REPO / installed[script_in_image] == HEALTHCHECK_SCRIPT


def test_the_command_picks_the_service(runtime: Stage) -> None:
    """No ENTRYPOINT: compose ``command:`` / Helm ``args:`` run ``python -m
    <service>`` or ``pacs migrate`` with the venv's python on PATH."""
    assert not runtime.arguments("ENTRYPOINT")
    environment = " ".join(runtime.arguments("ENV"))
    assert "PATH=/app/.venv/bin:$PATH" in environment
    pacs_common = tomllib.loads((REPO / "libs" / "common" / "pyproject.toml").read_text())
    assert pacs_common["project"]["scripts"]["pacs"] == "pacs_common.cli.main:main"
    for kind in SERVICE_KINDS:
        assert kind.installed(), f"python -m {kind.module} has no __main__"


def test_the_image_defaults_are_settings_the_code_reads(runtime: Stage) -> None:
    """The runtime ENV puts storage and spool under /app/data (the one
    directory the non-root user may write): misspelt, they would be ignored."""
    catalog = environment_variables()
    names = re.findall(r"\b(PACS_[A-Z0-9_]+)=", " ".join(runtime.arguments("ENV")))
    assert "PACS_STORAGE_HOT_PATH" in names
    unknown = [name for name in names if not is_known_environment_variable(name, catalog)]
    assert not unknown, f"not read by any settings class: {unknown}"


# -- the health-check script -----------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pacs_image_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    statuses = {"/health/live": 200, "/health/ready": 503}

    def do_GET(self) -> None:
        self.send_response(self.statuses.get(self.path, 404))
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _run_script(url: str | None) -> subprocess.CompletedProcess[str]:
    """The script as the image runs it: a fresh interpreter, URL from the environment."""
    environment = {key: value for key, value in os.environ.items() if key != "PACS_HEALTHCHECK_URL"}
    if url is not None:
        environment["PACS_HEALTHCHECK_URL"] = url
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )


def test_healthcheck_passes_on_a_2xx(health_server: str) -> None:
    assert _run_script(f"{health_server}/health/live").returncode == 0


def test_healthcheck_fails_on_an_error_status(health_server: str, healthcheck: ModuleType) -> None:
    code, reason = healthcheck.check(f"{health_server}/health/ready")
    assert code == 1 and "503" in reason


def test_healthcheck_fails_when_nothing_listens(healthcheck: ModuleType) -> None:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _ = healthcheck.check(f"http://127.0.0.1:{port}/health/live", timeout=2.0)
    assert code == 1


def test_healthcheck_fails_without_a_url() -> None:
    result = _run_script(None)
    assert result.returncode == 1 and "PACS_HEALTHCHECK_URL" in result.stderr
