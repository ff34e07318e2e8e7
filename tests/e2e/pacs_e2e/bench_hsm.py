"""Storage tier migration benchmark (``python -m pacs_e2e.bench_hsm``).

hot = a local directory, warm = S3 STANDARD_IA on a moto server, cold =
Azure Archive on Azurite (both started here, on loopback).  ``--instances``
synthetic instances of about ``--size-kb`` each (default 300 of 0.5 MB) are
written to hot and indexed (not timed); then the hsm-migrator's runner
(in-process, ``--concurrency`` objects at once, ``--batch-size`` claimed
per round trip, against a fresh PostgreSQL database) moves them hot → warm,
then warm → cold: each move copies, verifies the sha256 at the destination
(read back from S3; the recorded digest on Archive), switches the index and
deletes the source.  Prints instances/s and MB/s per hop and checks that
the index and the tiers agree at the end.  Prints figures; never fails on
time.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from hsm_migrator.metrics import HsmMetrics
from hsm_migrator.runner import Runner
from pacs_common.db.migrate import drop_database, upgrade
from pacs_common.db.pool import create_pool
from pacs_common.hsm.policy import Selection
from pacs_common.hsm.settings import HsmSettings
from pacs_common.hsm.testing import SeededInstance, build_test_tiers, consistency_problems, seed_instances
from pacs_common.settings import DatabaseSettings
from pacs_common.storage import StorageRegistry
from pacs_common.testing.database import unique_database_settings
from pacs_common.testing.storage_servers import start_azurite, start_moto_server

MB = 1_000_000
HOPS = (("hot", "warm"), ("warm", "cold"))


async def _bench(
    settings: DatabaseSettings, tiers: StorageRegistry, *, instances: int, size: int, hsm: HsmSettings
) -> list[dict[str, object]]:
    pool = await create_pool(settings, application_name="bench-hsm")
    try:
        started = time.monotonic()
        per_study = 50
        studies = max(1, (instances + per_study - 1) // per_study)
        seeded: list[SeededInstance] = []
        for _ in range(studies):
            count = min(per_study, instances - len(seeded))
            seeded += await seed_instances(pool, tiers.hot, instances_per_series=count, pixel_bytes=size)
        total_bytes = sum(i.size for i in seeded)
        print(
            f"stored and indexed {len(seeded)} instances, {total_bytes / MB:.1f} MB, "
            f"in {time.monotonic() - started:.1f}s (not timed)",
            flush=True,
        )
        runner = Runner(pool, tiers, hsm, owner="bench", metrics=HsmMetrics(CollectorRegistry()))
        rows: list[dict[str, object]] = []
        for source, target in HOPS:
            started = time.monotonic()
            result = await runner.run_pass([Selection(to_tier=target, from_tiers=(source,))], trigger="job")
            seconds = time.monotonic() - started
            rows.append(
                {
                    "hop": f"{source}→{target}",
                    "instances": result.moved,
                    "failed": result.failed,
                    "MB": round(result.moved_bytes / MB, 1),
                    "seconds": round(seconds, 2),
                    "inst/s": round(result.moved / seconds, 1),
                    "MB/s": round(result.moved_bytes / MB / seconds, 1),
                }
            )
            print(_format([rows[-1]]).splitlines()[-1], flush=True)
        problems = await consistency_problems(pool, tiers)
        print("index and tiers consistent" if not problems else f"INCONSISTENT: {problems[:5]}", flush=True)
        return rows
    finally:
        await pool.close()


def _format(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def run_hsm_bench(
    *, instances: int = 300, size_kb: int = 512, concurrency: int = 4, batch_size: int = 50
) -> None:
    print(
        f"\n== storage tier migration: {instances} instances of ~{size_kb} KB, "
        f"hot (directory) → warm (S3 STANDARD_IA, moto) → cold (Azure Archive, Azurite); "
        f"concurrency {concurrency}, batch {batch_size}",
        flush=True,
    )
    moto = start_moto_server()
    azurite = start_azurite()
    settings = unique_database_settings("pacs_bench_hsm")
    try:
        upgrade(settings)
        with tempfile.TemporaryDirectory(prefix="pacs-bench-hsm-") as workdir:
            tiers = build_test_tiers(
                Path(workdir) / "hot", s3_endpoint=moto.url, azure_connection_string=azurite.connection_string
            )
            hsm = HsmSettings(concurrency=concurrency, batch_size=batch_size, restores_enabled=False)
            try:
                rows = asyncio.run(_bench(settings, tiers, instances=instances, size=size_kb * 1024, hsm=hsm))
            finally:
                tiers.close()
        print(_format(rows), flush=True)
    finally:
        drop_database(settings)
        azurite.stop()
        moto.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size-kb", type=int, default=512, help="pixel data per instance (KiB)")
    parser.add_argument("--concurrency", type=int, default=4, help="objects copied at once")
    parser.add_argument("--batch-size", type=int, default=50, help="instances claimed per round trip")
    args = parser.parse_args(argv)
    run_hsm_bench(
        instances=args.instances,
        size_kb=args.size_kb,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
    )


if __name__ == "__main__":
    main()
