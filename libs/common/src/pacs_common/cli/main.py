"""The ``pacs`` admin command: migrate, run, status, dlq.

Exit codes: 0 success, 1 failure.  Failures that describe the environment
(a server down, a bad setting) print one line on stderr; only bugs print a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pacs_common.cli import (
    anonymize,
    convert,
    dlq,
    dump,
    hsm,
    media,
    migrate,
    nodes,
    prefetch,
    run,
    send,
    signatures,
    status,
    sync,
    tasks,
    to_json,
    to_xml,
    worklist,
)
from pacs_common.cli.common import CliError, expected_errors
from pacs_common.localrun.infra import InfraError, describe_error
from pacs_common.localrun.runner import LocalRunError

EXIT_OK = 0
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs",
        description="Administer the PACS: database migrations, the local system, status, "
        "the ingest dead-letter queue.  Settings come from PACS_* environment variables.",
    )
    parser.add_argument(
        "-C",
        "--project-dir",
        type=Path,
        default=Path.cwd(),
        metavar="DIR",
        help="where .pacs/ (logs, state, throwaway servers) lives (default: current directory)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        migrate,
        run,
        status,
        dlq,
        nodes,
        worklist,
        hsm,
        prefetch,
        tasks,
        anonymize,
        signatures,
        media,
        sync,
        dump,
        to_json,
        to_xml,
        convert,
        send,
    ):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.project_dir = args.project_dir.absolute()
    logging.basicConfig(level=logging.WARNING, format="pacs: %(levelname)s %(name)s: %(message)s")
    # aiormq logs each failed connection attempt at ERROR; the command reports it once.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        return int(args.handler(args))
    except (CliError, LocalRunError, InfraError) as exc:
        return _fail(args.command, str(exc))
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted")
    except Exception as exc:
        if not isinstance(exc, expected_errors()):
            raise
        return _fail(args.command, describe_error(exc))


def _fail(command: str, message: str) -> int:
    print(f"pacs {command}: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
