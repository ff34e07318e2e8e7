"""``pacs migrate``: bring the index schema to the newest revision.

Run by the Helm pre-install/pre-upgrade hook and by the local runner; safe to
run again (a schema already at head is left alone).  Creates the database
when the server has none of that name, so a fresh machine needs no psql step.
"""

from __future__ import annotations

import argparse

from pacs_common.cli.common import CliError, database_settings
from pacs_common.localrun.infra import ensure_database, probe_postgres, redact_url, run_sync
from pacs_common.localrun.runner import LocalRunError, load_migrations


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("migrate", help="apply database migrations, print the revision")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = database_settings(args.project_dir)
    where = redact_url(settings.url)
    problem = run_sync(lambda: probe_postgres(settings.url, 10.0))
    if problem is not None:
        raise CliError(f"database unreachable: {problem} ({where})")
    try:
        upgrade, current_revision = load_migrations()
    except LocalRunError as exc:
        raise CliError(str(exc)) from exc
    if ensure_database(settings.url):
        print(f"created database {where}")
    before = current_revision(settings)
    upgrade(settings)
    after = current_revision(settings)
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: migrated from {before or 'an empty schema'} to revision {after}")
    return 0
