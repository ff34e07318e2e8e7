"""Driving DCMTK's command-line tools (real peers nobody here wrote)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_e2e.corpus import CorpusFile

# Debian's DCMTK does not set TCP_NODELAY unless told: without it every
# response waits ~40 ms for the delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
MAX_PRESENTATION_CONTEXTS = 128


def tool(name: str) -> str:
    """The DCMTK binary ``name``: pynetdicom installs Python apps with the same
    names (storescu, echoscu, storescp…) into the virtualenv, so look for a
    native executable on PATH."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / name
        try:
            with candidate.open("rb") as f:
                if f.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return str(candidate)
        except OSError:
            continue
    raise FileNotFoundError(f"DCMTK's {name} is not installed (apt package dcmtk)")


def dcmtk_available() -> bool:
    try:
        tool("storescu")
        tool("echoscu")
        tool("storescp")
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str


def run(args: Sequence[str], timeout: float = 600) -> Result:
    proc = subprocess.run(
        [tool(args[0]), *args[1:]],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout + proc.stderr)


def echoscu(port: int, *, called: str = "PACS", calling: str = "E2E", host: str = "127.0.0.1") -> Result:
    return run(["echoscu", "-aet", calling, "-aec", called, host, str(port)], timeout=60)


def write_storescu_config(files: Iterable[CorpusFile], path: Path) -> str:
    """A storescu config proposing, for each SOP class, exactly the transfer
    syntaxes the files are encoded in, so storescu sends every file as it is
    (no conversion) in one association.  Returns the profile name."""
    syntaxes: dict[str, str] = {}
    contexts: list[tuple[str, str]] = []
    for f in files:
        key = syntaxes.setdefault(f.transfer_syntax_uid, f"TS{len(syntaxes)}")
        if (f.sop_class_uid, key) not in contexts:
            contexts.append((f.sop_class_uid, key))
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts; DICOM allows {MAX_PRESENTATION_CONTEXTS}")
    lines = ["[[TransferSyntaxes]]"]
    for uid, key in syntaxes.items():
        lines += [f"[{key}]", f"TransferSyntax1 = {uid}"]
    lines += ["[[PresentationContexts]]", "[CorpusContexts]"]
    lines += [f"PresentationContext{i} = {sop}\\{key}" for i, (sop, key) in enumerate(contexts, 1)]
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = CorpusContexts"]
    path.write_text("\n".join(lines) + "\n")
    return "Corpus"


def storescu(
    port: int,
    paths: Sequence[Path],
    *,
    called: str = "PACS",
    calling: str = "E2E",
    config: tuple[Path, str] | None = None,
    host: str = "127.0.0.1",
    timeout: float = 900,
    extra: Sequence[str] = (),
) -> Result:
    """Send files over one association; -nh: carry on past a failed store."""
    args = ["storescu", "-nh", "-v", "-aet", calling, "-aec", called]
    if config is not None:
        args += ["-xf", str(config[0]), config[1]]
    args += [*extra, host, str(port), *map(str, paths)]
    return run(args, timeout=timeout)


class BackgroundStore:
    """storescu running in the background while a test breaks something."""

    def __init__(
        self, port: int, paths: Sequence[Path], *, called: str = "PACS", extra: Sequence[str] = ()
    ) -> None:
        args = [tool("storescu"), "-nh", "-v", "-aet", "E2E", "-aec", called, *extra, "127.0.0.1", str(port)]
        self._proc = subprocess.Popen(
            [*args, *map(str, paths)],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait(self, timeout: float = 600) -> Result:
        output, _ = self._proc.communicate(timeout=timeout)
        return Result(self._proc.returncode, output)


def store_outcomes(result: Result) -> dict[str, str]:
    """File → storescu's verdict ("Success", "Refused: OutOfResources", …,
    or "not sent"), parsed from its -v output."""
    outcomes: dict[str, str] = {}
    current: str | None = None
    for line in result.output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
            outcomes[current] = "not sent"
        elif line.startswith("I: Received Store Response") and current is not None:
            outcomes[current] = line.partition("(")[2].rstrip(")") or line
            current = None
    return outcomes


class ReferenceReceiver:
    """DCMTK's storescp in bit-preserving mode: what it writes is exactly what
    storescu sent, so comparing against it checks "stored bytes equal the
    bytes sent" without trusting our own code for either side."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ReferenceReceiver:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                tool("storescp"),
                "-B",
                "-tn",
                "+xa",
                "-od",
                str(self.directory),
                "-aet",
                "REFERENCE",
                str(self.port),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while echoscu(self.port, called="REFERENCE").returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)

    def received(self) -> list[Path]:
        """The received files in arrival order (storescp -tn names them by time)."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())


def _keys(keys: Sequence[str]) -> list[str]:
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    return args


def findscu(
    port: int,
    model: str,
    keys: Sequence[str],
    out_dir: Path,
    *,
    called: str = "PACS",
    calling: str = "E2E",
    extra: Sequence[str] = (),
) -> tuple[Result, list[Dataset]]:
    """C-FIND with DCMTK's findscu (``model``: -P, -S or -W); returns the
    result and the response identifiers it extracted (-X), in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-v", model, "-aet", calling, "-aec", called, "-X", "-od", str(out_dir)]
    result = run([*args, *_keys(keys), *extra, "127.0.0.1", str(port)], timeout=120)
    responses: list[Dataset] = [dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]
    return result, responses


def movescu(
    port: int,
    model: str,
    keys: Sequence[str],
    destination: str,
    *,
    out_dir: Path | None = None,
    receive_port: int | None = None,
    called: str = "PACS",
    calling: str = "E2E",
    extra: Sequence[str] = (),
) -> Result:
    """C-MOVE with DCMTK's movescu.  With ``receive_port``, movescu itself
    is the destination (its own storage SCP writes to ``out_dir``)."""
    args = ["movescu", "-v", model, "-aet", calling, "-aec", called, "-aem", destination]
    if receive_port is not None:
        assert out_dir is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        args += ["--port", str(receive_port), "-od", str(out_dir)]
    return run([*args, *_keys(keys), *extra, "127.0.0.1", str(port)], timeout=300)


def getscu(
    port: int,
    model: str,
    keys: Sequence[str],
    out_dir: Path,
    *,
    called: str = "PACS",
    calling: str = "E2E",
    extra: Sequence[str] = (),
) -> Result:
    """C-GET with DCMTK's getscu; the instances land in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-v", model, "-aet", calling, "-aec", called, "-od", str(out_dir)]
    return run([*args, *_keys(keys), *extra, "127.0.0.1", str(port)], timeout=300)


def final_status(result: Result, operation: str) -> str:
    """The status text of the final C-MOVE/C-GET response in a -v log,
    e.g. "Success" or "Warning" ("" when there was none)."""
    status = ""
    marker = f"Received Final {operation} Response"
    for line in result.output.splitlines():
        if marker in line:
            status = line.partition("(")[2].rstrip(")").strip()
    return status
