"""Reading the services' Prometheus metrics, to know when the system is quiet."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pacs_common.localrun.runner import LocalSystem


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(system: LocalSystem, kind: str, name: str, **labels: str) -> float:
    """Sum of a counter over every process of one kind (gateway or worker)."""
    services = system.gateways if kind == "gateway" else system.workers
    value = 0.0
    for service in services:
        for (sample, sample_labels), v in scrape(service.metrics_url).items():
            if sample == name and all(dict(sample_labels).get(k) == w for k, w in labels.items()):
                value += v
    return value


def wait_until_drained(system: LocalSystem, timeout: float = 120) -> None:
    """Wait until the workers have handled every instance the gateways
    acknowledged (indexed, found unchanged, or dead-lettered).  Valid while
    no worker restarted (counters start at zero in a new process)."""
    deadline = time.monotonic() + timeout
    while True:
        acknowledged = total(
            system, "gateway", "pacs_dimse_operations_total", operation="C-STORE", status="0x0000"
        )
        handled = total(system, "worker", "pacs_ingest_instances_total") + total(
            system, "worker", "pacs_ingest_dead_lettered_total"
        )
        if handled >= acknowledged:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"workers handled {handled} of {acknowledged} acknowledged instances")
        time.sleep(0.2)
