"""``pacs run``: the whole system as local processes, in the foreground."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run every service locally (starts PostgreSQL/RabbitMQ if none answers)",
        description="Start PostgreSQL and RabbitMQ if the configured ones do not answer, apply "
        "migrations, start the services as processes, print the endpoints; Ctrl-C stops all.",
    )
    parser.add_argument("--gateways", type=_count, default=1, metavar="N", help="gateway processes")
    parser.add_argument("--workers", type=_count, default=1, metavar="M", help="worker processes")
    parser.add_argument("--port", type=_port, default=None, metavar="P", help="DICOM port (default 11112)")
    parser.add_argument("--ae-title", default=None, metavar="T", help="our AE title (default PACS)")
    parser.add_argument(
        "--http-port-base",
        type=_port,
        default=None,
        metavar="P",
        help="first health/metrics port, one per process (default 8081; 0 = any free)",
    )
    parser.add_argument(
        "--throwaway-infra",
        action="store_true",
        help="always start private PostgreSQL/RabbitMQ under .pacs/infra",
    )
    parser.add_argument(
        "--prometheus",
        type=_port,
        nargs="?",
        const=9090,
        default=None,
        metavar="PORT",
        help="also start Prometheus (Debian /usr/bin/prometheus) scraping every service with the "
        "alert rules of deploy/observability loaded, on PORT (default 9090; 0 = any free)",
    )
    parser.set_defaults(handler=run)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number")
    return value


def run(args: argparse.Namespace) -> int:
    from pacs_common.localrun.prometheus import PrometheusOptions
    from pacs_common.localrun.runner import LocalSystem

    system = LocalSystem(
        args.project_dir,
        gateways=args.gateways,
        workers=args.workers,
        gateway_port=args.port,
        ae_title=args.ae_title,
        http_port_base=args.http_port_base,
        throwaway_infra=args.throwaway_infra,
        prometheus=None if args.prometheus is None else PrometheusOptions(port=args.prometheus),
    )
    return system.run()
