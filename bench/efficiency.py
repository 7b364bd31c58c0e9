"""Figure 3: service steps/s over the in-process limit at the same mean batch size."""

from __future__ import annotations

from cellstream.bench.stats import log2_interpolate


def efficiency(service: dict[str, dict], limit: dict) -> list[dict[str, object]]:
    """One row per service run: its steps/s, the limit's at its mean batch size, and their ratio."""
    curve = [(point["batch"], point["steps_per_s"]) for point in limit["steps"]]
    rows = []
    for config, measured in service.items():
        for run in measured["runs"]:
            at_batch = log2_interpolate(curve, run["mean_batch"])
            rows.append({
                "config": config, "api": run["api"], "sessions": run["sessions"], "calls": run["calls"],
                "mean_batch": run["mean_batch"],
                "service_steps_per_s": run["steps_per_s"], "limit_steps_per_s": at_batch,
                "efficiency": run["steps_per_s"] / at_batch,
            })
    return rows
