"""What the ``pacs`` file commands share: walking the inputs, reading DICOM
files, naming outputs and the per-file report.

Every file command accepts files and directories (walked recursively, in
name order) and goes on past a bad file: each file gets one report line,
``OK path`` on stdout or ``ERROR path: reason`` on stderr, then a summary;
the exit code is 1 when any file failed.  ``--json`` replaces the lines by
one JSON document on stdout (:meth:`FileReport.finish`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError

EXIT_OK = 0
EXIT_FAILURE = 1


class FileError(Exception):
    """One file cannot be processed; ``str(exc)`` is the reason shown to the user."""


@dataclass(frozen=True)
class InputFile:
    """A file to process and its path relative to the input it was found under
    (its own name when given directly): the name its output gets."""

    path: Path
    relative: Path


def input_files(
    inputs: Iterable[Path],
    *,
    exclude: Path | None = None,
    suffixes: tuple[str, ...] = (),
    on_missing: Callable[[Path], None],
) -> Iterator[InputFile]:
    """The files of ``inputs``; directories are walked recursively in name
    order, without what lies under ``exclude`` (the output directory) and,
    when ``suffixes`` are given, only the files whose names end so (a file
    named directly is always taken).  A missing input goes to ``on_missing``."""
    excluded = exclude.absolute() if exclude is not None else None
    for given in inputs:
        if given.is_dir():
            for path in sorted(given.rglob("*")):
                if not path.is_file():
                    continue
                if excluded is not None and path.absolute().is_relative_to(excluded):
                    continue
                if suffixes and not path.name.lower().endswith(suffixes):
                    continue
                yield InputFile(path, path.relative_to(given))
        elif given.is_file():
            yield InputFile(given, Path(given.name))
        else:
            on_missing(given)


def read_dicom(path: Path, *, stop_before_pixels: bool = False) -> FileDataset:
    """A Part 10 file read by pydicom, or :class:`FileError` saying why not."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise FileError("not a DICOM file (no Part 10 header)") from None
    except OSError as exc:
        raise FileError(f"cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # a damaged file: pydicom raises many kinds
        raise FileError(f"unreadable DICOM file: {type(exc).__name__}: {exc}") from exc


def output_path(outdir: Path, item: InputFile, *, add: str = "", strip: str = "") -> Path:
    """Where the output of ``item`` goes: its relative path under ``outdir``,
    with ``strip`` removed from the end of the name (when it ends so) and
    ``add`` appended."""
    name = item.relative.name
    if strip and name.lower().endswith(strip) and len(name) > len(strip):
        name = name[: -len(strip)]
    return outdir / item.relative.parent / f"{name}{add}"


@dataclass
class OutputNames:
    """The outputs written in one run: two inputs with the same relative
    path (from different input folders) must not overwrite each other."""

    claimed: dict[Path, Path] = field(default_factory=dict)

    def claim(self, target: Path, source: Path) -> Path:
        earlier = self.claimed.setdefault(target, source)
        if earlier != source:
            raise FileError(f"its output {target} was already written for {earlier}")
        return target


@dataclass
class FileOutcome:
    path: Path
    ok: bool
    detail: str = ""


@dataclass
class FileReport:
    """The per-file report of one command run."""

    command: str
    json_output: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    outcomes: list[FileOutcome] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(not outcome.ok for outcome in self.outcomes)

    @property
    def succeeded(self) -> int:
        return sum(outcome.ok for outcome in self.outcomes)

    def ok(self, path: Path, detail: str = "") -> None:
        self.outcomes.append(FileOutcome(path, True, detail))
        if not self.json_output:
            print(f"OK {path}" + (f"  {detail}" if detail else ""), file=self.out, flush=True)

    def error(self, path: Path, reason: str) -> None:
        self.outcomes.append(FileOutcome(path, False, reason))
        if not self.json_output:
            print(f"ERROR {path}: {reason}", file=self.err, flush=True)

    def missing(self, path: Path) -> None:
        self.error(path, "no such file or directory")

    def finish(self, extra: dict[str, Any] | None = None) -> int:
        """Print the summary (or the JSON report); the exit code."""
        if self.json_output:
            document: dict[str, Any] = {
                "command": self.command,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "files": [
                    {"path": str(o.path), "status": "OK" if o.ok else "ERROR", "detail": o.detail}
                    for o in self.outcomes
                ],
            }
            document.update(extra or {})
            print(json.dumps(document, indent=2), file=self.out)
        else:
            print(f"pacs {self.command}: {self.succeeded} file(s) OK, {self.failed} failed", file=self.out)
        return EXIT_FAILURE if self.failed else EXIT_OK


def run_per_file(
    report: FileReport,
    items: Iterable[InputFile],
    process: Callable[[InputFile], str],
) -> None:
    """``process`` each item, reporting OK (with the detail it returns) or
    the :class:`FileError` / unexpected error it raised, and go on."""
    for item in items:
        try:
            detail = process(item)
        except FileError as exc:
            report.error(item.path, str(exc))
        except Exception as exc:  # one bad file must not stop the others
            report.error(item.path, f"{type(exc).__name__}: {exc}")
        else:
            report.ok(item.path, detail)


def add_inputs_argument(parser: argparse.ArgumentParser, what: str = "DICOM files or directories") -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="SRC", help=f"{what} (walked recursively)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one machine-readable JSON report instead of lines"
    )
