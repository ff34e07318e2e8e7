"""``pacs dlq list|replay``: look at and replay the ingest dead-letter queue.

A message lands there after its retries ran out (a file the worker cannot
parse, a database that refused a row…).  Once the cause is fixed, replaying
puts it back on the ingest queue with a fresh attempt budget; indexing is
idempotent, so replaying something that was in fact indexed changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from pacs_common.cli.common import CliError, broker_settings, open_broker
from pacs_common.localrun.infra import run_sync
from pacs_common.settings import BrokerSettings

if TYPE_CHECKING:
    from pacs_common.messaging.broker import Broker


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("dlq", help="inspect or replay the ingest dead-letter queue")
    commands = parser.add_subparsers(dest="dlq_command", metavar="{list,replay}", required=True)

    listing = commands.add_parser("list", help="show dead letters (the queue is left as it was)")
    listing.add_argument("--limit", type=_positive, default=100, metavar="N")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=run_list)

    replay = commands.add_parser("replay", help="move dead letters back to the ingest queue")
    which = replay.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument("--message-id", metavar="ID", help="only the letter(s) with this id")
    replay.add_argument("--limit", type=_positive, default=None, metavar="N", help="at most N")
    replay.set_defaults(handler=run_replay)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def run_list(args: argparse.Namespace) -> int:
    from pacs_common.messaging.dlq import DeadLetter, list_dead_letters

    settings = broker_settings(args.project_dir)

    async def fetch() -> list[DeadLetter]:
        async with open_broker(settings, declare=False) as broker:
            if not await _has_dead_letter_queue(broker):
                return []
            return await list_dead_letters(broker, args.limit)

    letters = run_sync(fetch)
    if args.json:
        print(json.dumps([dataclasses.asdict(letter) for letter in letters], indent=2))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    print(f"{'MESSAGE ID':<36}  {'ATTEMPTS':>8}  {'FAILED AT':<25}  {'SOP INSTANCE UID':<40}  REASON")
    for letter in letters:
        print(
            f"{letter.message_id:<36}  {letter.attempts:>8}  {letter.failed_at or '-':<25}  "
            f"{letter.sop_instance_uid or '-':<40}  {letter.reason}"
        )
    more = " (more may follow: raise --limit)" if len(letters) == args.limit else ""
    print(f"{len(letters)} dead letter(s){more}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    if not (args.all or args.message_id or args.limit):
        raise CliError("say what to replay: --all, --message-id ID or --limit N")
    settings = broker_settings(args.project_dir)
    moved = run_sync(lambda: _replay(settings, limit=args.limit, message_id=args.message_id))
    if args.message_id and moved == 0:
        raise CliError(f"no dead letter with message id {args.message_id}")
    print(f"replayed {moved} dead letter(s) to the ingest queue")
    return 0


async def _has_dead_letter_queue(broker: Broker) -> bool:
    """Whether the DLQ exists: looking must not declare a topology on a broker
    (and namespace) no PACS has used yet."""
    try:
        await broker.queue_depth(broker.topology.dead_letter_queue)
    except LookupError:
        return False
    return True


async def _replay(settings: BrokerSettings, *, limit: int | None, message_id: str | None) -> int:
    from pacs_common.messaging.broker import PublishError
    from pacs_common.messaging.dlq import replay_dead_letters

    async with open_broker(settings, declare=False) as broker:
        if not await _has_dead_letter_queue(broker):
            return 0
    async with open_broker(settings, declare=True) as broker:
        try:
            return await replay_dead_letters(broker, limit=limit, message_id=message_id)
        except PublishError as exc:
            raise CliError(f"replay stopped, the broker refused a message: {exc.reason}") from exc
