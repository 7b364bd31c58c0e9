"""Reads the server's batch-size histogram from its Prometheus /metrics endpoint."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE = "cellstream_batch_size"


@dataclass(frozen=True)
class BatchCounters:
    """Cumulative counts of the server's batch-size histogram, summed over its models."""

    batches: float  # onnxruntime calls
    steps: float  # session steps in them


def batch_counters(metrics_url: str) -> BatchCounters:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    batches = steps = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_SIZE:
            continue
        for sample in family.samples:
            if sample.name == f"{BATCH_SIZE}_count":
                batches += sample.value
            elif sample.name == f"{BATCH_SIZE}_sum":
                steps += sample.value
    return BatchCounters(batches, steps)
